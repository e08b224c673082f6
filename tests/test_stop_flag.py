"""A stop signal under several ranks: each rank's flag is summed over a gloo group one step late, so no step waits
for it, and every rank stops at the same step, at a stage's end too."""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import spawn_gloo

from bind.distributed import SINGLE_PROCESS, Dist
from bind.train.monitor import StopFlag


def _worker(rank: int, dist: Dist, out: str) -> None:
    answers = []
    flag = StopFlag()
    for step in range(1, 7):  # rank 1 gets SIGTERM during step 3
        if rank == 1 and step == 3:
            flag.signal_name = "SIGTERM"
        answers.append(flag.requested(dist))
        if answers[-1]:
            break
    at_stage_end = StopFlag()  # a signal during a stage's last step: seen by settle, on every rank
    at_stage_end.requested(dist)
    if rank == 0:
        at_stage_end.signal_name = "SIGINT"
    last = at_stage_end.requested(dist)
    settled = at_stage_end.settle()
    Path(out, f"rank{rank}.txt").write_text(f"{answers} {last} {settled} {at_stage_end.signal_name}")


def test_every_rank_stops_at_the_same_step_and_at_a_stages_end():
    with tempfile.TemporaryDirectory() as out:
        spawn_gloo(_worker, out)
        got = [Path(out, f"rank{r}.txt").read_text() for r in range(2)]
    # the flag raised in step 3 is read in step 4 by both; at the stage's end settle says stop on both (the rank
    # that had no signal names it SIGTERM: the sum carries no name)
    assert got == ["[False, False, False, True] False True SIGINT", "[False, False, False, True] False True SIGTERM"]


def test_one_process_looks_at_its_flag_only():
    flag = StopFlag()
    assert not flag.requested(SINGLE_PROCESS)
    flag.signal_name = "SIGTERM"
    assert flag.requested(Dist()) and not flag.settle()
