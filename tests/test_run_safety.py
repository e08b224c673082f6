"""Run-directory safety: one writer per --out, no silent deletion of unfinished work, checkpoints that verify.

Real `bindkit run` processes where the lock matters (a second process, a dead one); a process is held
still with SIGSTOP while the other tries its luck, so no outcome depends on timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_resume import assert_same_weights, bindkit, finish, tiny_recipe

from bind.errors import ConfigError, DataError
from bind.recipe import parse_recipe
from bind.runs import load_run
from bind.train.checkpoint import MANIFEST, NO_MANIFEST, list_checkpoints, remove_checkpoint, verify_checkpoint
from bind.train.runlock import LOCK_NAME, RunDirectoryBusy, run_lock
from bind.train.trainer import _clear_finished_checkpoints, run_recipe

STEPS = (2, 2)  # pretrain, bind: four checkpoints, all kept
KILLED_HOLDER = (
    "import os, signal, sys\n"
    "from bind.train.runlock import run_lock\n"
    "with run_lock(__import__('pathlib').Path(sys.argv[1])):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, data_root) -> Path:
    data = tiny_recipe(data_root)
    data["stages"][0]["steps"], data["stages"][1]["steps"] = STEPS
    data["keep_checkpoints"] = 10
    path = tmp_path_factory.mktemp("safety") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def whole(recipe_file) -> Path:
    """An uninterrupted run, started in a folder whose lock file a SIGKILLed process left behind."""
    run = recipe_file.parent / "whole"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_HOLDER, str(run)])
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert (run / LOCK_NAME).read_text().startswith(f"pid {killed.pid} on ")  # a lock file nobody holds
    done = finish(bindkit(str(recipe_file), "--out", str(run)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pid {killed.pid} " not in (run / LOCK_NAME).read_text()
    return run


def names(directory: Path) -> list[str]:
    return [c.path.name for c in list_checkpoints(directory)]


def snapshot(run: Path) -> dict[str, int]:
    """Every file under ``run`` (hidden ones included) and its size; the lock file only by name (whoever takes the
    lock writes its own pid there, whose digits vary)."""
    return {
        str(p.relative_to(run)): 0 if p.name == LOCK_NAME else p.stat().st_size
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def logged_steps(run: Path) -> list[tuple[str, int]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"]) for r in records if "step" in r]


def wait_for_checkpoint(run: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list_checkpoints(run / "checkpoints"):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no checkpoint under {run}"
        time.sleep(0.02)


# ---- one writer per run directory -------------------------------------------------------------------
def test_a_second_run_or_resume_beside_a_live_run_is_refused_and_deletes_nothing(recipe_file, whole, tmp_path):
    run = tmp_path / "live"
    first = bindkit(str(recipe_file), "--out", str(run))
    wait_for_checkpoint(run, first)
    first.send_signal(signal.SIGSTOP)  # mid-run, lock held (maybe mid-checkpoint): nothing may touch its files
    try:
        before = snapshot(run)
        fresh = bindkit(str(recipe_file), "--out", str(run))
        resume = bindkit(str(recipe_file), "--out", str(run), "--resume")
        refused = [finish(fresh), finish(resume)]
        after = snapshot(run)
    finally:
        first.send_signal(signal.SIGCONT)
    for done in refused:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert f"{run}: another bindkit run is writing to this folder (pid {first.pid} on " in lines[0]
    assert after == before
    done = finish(first)
    assert done.returncode == 0, done.stderr[-3000:]
    load_run(run)  # complete and loadable
    assert_same_weights(run, whole)  # nothing interleaved: the same run as one alone
    assert logged_steps(run) == logged_steps(whole)
    assert names(run / "checkpoints") == names(whole / "checkpoints")


def test_a_stale_lock_blocks_nothing(whole, tmp_path):
    # whole itself ran over a lock file that a SIGKILLed holder left behind (see the fixture)
    (tmp_path / LOCK_NAME).write_text("pid 999999 on a-machine-long-gone, since 2020-01-01 00:00:00\n")
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        busy = rf"{re.escape(str(tmp_path))}: another bindkit run .*\(pid {os.getpid()} on "
        with pytest.raises(RunDirectoryBusy, match=busy), run_lock(tmp_path):  # a second open file conflicts too
            pass
    with run_lock(tmp_path):  # released at the end of the block
        pass


# ---- a fresh run never deletes unfinished work ------------------------------------------------------
def later_unfinished_run(run: Path, whole: Path, checkpoint: str) -> None:
    """A finished run, then a fresh run in the same folder that wrote ``checkpoint`` and died."""
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(whole / "checkpoints" / checkpoint, run / "checkpoints" / checkpoint, copy_function=shutil.copy)


@pytest.mark.parametrize(
    "later",
    [
        "stage0-step0000001",  # died early
        "stage1-step0000002",  # trained to the end, died before saving its model
        None,  # the newest checkpoint is not the end of its run, whatever the clocks say
    ],
)
def test_a_fresh_run_refuses_checkpoints_newer_than_the_finished_model(recipe_file, whole, tmp_path, later):
    run = tmp_path / "run"
    shutil.copytree(whole, run)  # times kept: the finished run's checkpoints are older than its model
    if later:
        later_unfinished_run(run, whole, later)
    else:
        for checkpoint in list_checkpoints(run / "checkpoints")[2:]:
            shutil.rmtree(checkpoint.path)
    before = snapshot(run)
    recipe = parse_recipe(yaml.safe_load(recipe_file.read_text()))
    with pytest.raises(ConfigError, match=r"holds the checkpoints of an unfinished run .*continue it with --resume"):
        run_recipe(recipe, run, show_progress=False)
    assert snapshot(run) == before


def test_a_fresh_run_replaces_a_finished_runs_checkpoints(whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    _clear_finished_checkpoints(run, run / "checkpoints")
    assert not (run / "checkpoints").exists()


# ---- checkpoints verify themselves ------------------------------------------------------------------
def damage(checkpoint: Path, how: str) -> None:
    if how == "truncated optimizer":
        with open(checkpoint / "optimizer.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(checkpoint / "optimizer.safetensors") // 2)
    elif how == "empty trainer_state":
        (checkpoint / "trainer_state.json").write_text("")
    elif how == "flipped byte":
        data = bytearray((checkpoint / "rng.safetensors").read_bytes())
        data[-1] ^= 1
        (checkpoint / "rng.safetensors").write_bytes(data)
    elif how == "no manifest":
        (checkpoint / MANIFEST).unlink()


REASONS = {
    "truncated optimizer": r"optimizer\.safetensors: \d+ bytes, the manifest says \d+",
    "empty trainer_state": r"trainer_state\.json: 0 bytes, the manifest says \d+",
    "flipped byte": r"rng\.safetensors: its SHA-256 differs",
    "no manifest": r"no manifest \(written by an older bindkit or cut short\)",
}


@pytest.mark.parametrize("how", REASONS)
def test_a_damaged_checkpoint_does_not_verify(whole, tmp_path, how):
    shutil.copytree(whole / "checkpoints", tmp_path, dirs_exist_ok=True)
    good, newest = list_checkpoints(tmp_path)[-2:]
    assert verify_checkpoint(newest) is None and verify_checkpoint(good) is None
    damage(newest.path, how)
    assert re.match(REASONS[how], verify_checkpoint(newest) or "")
    assert verify_checkpoint(good) is None


def test_every_file_the_manifest_lists_is_checked_by_its_sha256(tmp_path):
    """The manifest lists every file of the checkpoint with its SHA-256 (computed here with hashlib), and one
    flipped byte in any of them, the size unchanged, fails verification naming that file."""
    import hashlib

    import torch

    from bind import create_encoder
    from bind.model import BindModel
    from bind.recipe import OptimSpec
    from bind.train.checkpoint import save_checkpoint
    from bind.train.optim import build_optimizer

    torch.manual_seed(0)
    model = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=8)}, "image")
    params = list(model.parameters())
    optimizer, scheduler = build_optimizer(params, OptimSpec(), total_steps=4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # moments to save
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, 0, 1, {"total_steps": 4})
    checkpoint = list_checkpoints(tmp_path)[0]
    assert checkpoint.path == path and verify_checkpoint(checkpoint) is None

    listed = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()} - {MANIFEST}
    assert set(listed) == on_disk and len(on_disk) >= 5
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    for name in sorted(listed, reverse=True):  # the last listed first: a check stopping early misses it
        original = (path / name).read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        (path / name).write_bytes(flipped)
        assert verify_checkpoint(checkpoint) == f"{name}: its SHA-256 differs from the manifest's"
        (path / name).write_bytes(original)
        assert verify_checkpoint(checkpoint) is None


def test_a_checkpoint_without_its_manifest_is_not_complete_and_pruning_removes_the_manifest_first(
    whole, tmp_path, monkeypatch
):
    shutil.copytree(whole / "checkpoints", tmp_path, dirs_exist_ok=True)
    oldest = list_checkpoints(tmp_path)[0]
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a prune cut short after its first deletion
    remove_checkpoint(oldest.path)
    assert oldest.path.is_dir() and oldest.path.name not in names(tmp_path)
    assert verify_checkpoint(oldest) == NO_MANIFEST


def test_resume_skips_damaged_checkpoints_and_ends_with_the_same_weights(recipe_file, whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    (run / "model.safetensors").unlink()  # as if stopped after its last checkpoint
    checkpoints = [c.path for c in list_checkpoints(run / "checkpoints")]
    damaged = {
        checkpoints[3]: "truncated optimizer",
        checkpoints[2]: "empty trainer_state",
        checkpoints[1]: "no manifest",
    }
    for path, how in damaged.items():
        damage(path, how)
    done = finish(bindkit(str(recipe_file), "--out", str(run), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "skipped for resuming" in line]
    assert [w.split(":")[0].split()[-1] for w in warnings] == [str(p) for p in damaged]  # newest first
    assert "no manifest" in warnings[2] and "optimizer.safetensors" in warnings[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "audio_specialist", "event": "resumed", "from_step": 1} in records  # the oldest, good one
    assert_same_weights(run, whole)
    assert all(verify_checkpoint(c) is None for c in list_checkpoints(run / "checkpoints"))  # rewritten whole


def test_resume_with_no_intact_checkpoint_is_one_line(recipe_file, whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for checkpoint in list_checkpoints(run / "checkpoints"):
        damage(checkpoint.path, "no manifest")
    recipe = parse_recipe(yaml.safe_load(recipe_file.read_text()))
    with pytest.raises(DataError) as caught:
        run_recipe(recipe, run, show_progress=False, resume=True)
    message = str(caught.value)
    assert "\n" not in message and f"--resume: no checkpoint in {run / 'checkpoints'} is intact" in message
    assert "stage1-step0000002: no manifest" in message and "start over" in message


def test_nproc_beside_a_live_run_is_refused_in_one_line_before_torchrun_starts(recipe_file, tmp_path):
    from bind.train.runlock import run_lock

    out = tmp_path / "busy"
    with run_lock(out):  # this test process is the live writer
        done = subprocess.run(
            [sys.executable, "-m", "bind", "run", str(recipe_file), "--out", str(out), "--nproc", "2", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"pid {os.getpid()}" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".bindkit.lock"]  # nothing written beside the lock
