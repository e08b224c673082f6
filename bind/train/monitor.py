"""What a training loop reports and listens to: ``metrics.jsonl`` (and TensorBoard), and stop signals."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from ..distributed import Dist
from ..errors import ConfigError


class MetricsLog:
    """One JSON object per line in ``metrics.jsonl``; the scalars also to TensorBoard when asked."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['stage']}/{key}", value, record["step"])
            for key, value in record.get("losses", {}).items():
                self.writer.add_scalar(f"{record['stage']}/loss_{key}", value, record["step"])


def stage_summaries(path: Path) -> list[dict[str, Any]]:
    """The ``stage_done`` records of a ``metrics.jsonl`` (the last one of each stage: a resumed run's own)."""
    last: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "stage_done":
                last[str(record.get("stage"))] = record
    return list(last.values())


def format_stage_summaries(summaries: list[dict[str, Any]]) -> str:
    """Where each stage's time went, one line per stage."""
    lines = ["time per stage (data wait: blocked on the loaders; the rest is forward, backward and update):"]
    for s in summaries:
        lines.append(
            f"  {s['stage']:<20} {s['steps']:>6} steps  {s['seconds']:>8.1f} s  data wait {100 * s['data_wait_fraction']:5.1f}%"
            f"  {s['samples_per_s']:>8.0f} samples/s"
        )
    return "\n".join(lines)


class StopFlag:
    """SIGTERM and SIGINT set a flag instead of killing the process: the loop checkpoints, then stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None  # the all-reduce of the last step's flag, in flight
        self._group: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        # torchrun and terminals repeat a signal (Ctrl-C reaches every process, then torchrun forwards it):
        # the second one must not break the checkpoint being written; a third stops at once
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def requested(self, dist: Dist) -> bool:
        """Whether to stop after this step; with several ranks, any rank's signal stops all at the same step.

        One process: a look at the flag. Several: each step starts an all-reduce of this rank's flag over a CPU
        (gloo) group and reads the previous step's, which is done by then: no step waits for the GPU or the
        network for it, and every rank stops at the same step, within two steps of the signal (at the end of
        a stage, :meth:`settle`)."""
        if not dist.enabled:
            return self.signal_name is not None
        if self.settle():  # every rank read the same sum: all stop here, none starts another all-reduce
            return True
        flag = torch.tensor([float(self.signal_name is not None)])
        self._pending = (torch.distributed.all_reduce(flag, group=self._cpu_group(), async_op=True), flag)
        return False

    def settle(self) -> bool:
        """Wait for the all-reduce in flight and say whether it asks to stop (each step reads the last one's; at
        the end of a stage the loop calls it itself). Every rank
        started the same ones and reads the same sum; a signal in a stage's last step stops the run there, not
        after the next stage has been set up (a feature cache may take minutes)."""
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        if flag[0] > 0:
            self.signal_name = self.signal_name or "SIGTERM"  # another rank's signal: the sum carries no name
            return True
        return False

    def _cpu_group(self) -> Any:
        """A gloo group of its own over all ranks (never the default group: the flag's all-reduce is in flight
        while the step's collectives run there), made on first use: every rank reaches that at the same step,
        as ``new_group`` needs."""
        if self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group
