"""Crash safety: kill a real `bindkit run` and resume it to the same weights; signals, NaN losses, bad items."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from bind.bench.ddp import check_recipe
from bind.data import build_dataset
from bind.errors import ConfigError, DataError, TrainingError
from bind.recipe import parse_recipe
from bind.train.checkpoint import list_checkpoints
from bind.train.stage import StageRunner
from bind.train.trainer import build_model, run_recipe, seed_everything

STEPS = (5, 6)  # pretrain, bind


def tiny_recipe(data_root: Path) -> dict:
    """Two stages of a small audio transformer (dropout on, augmentation on) against a frozen image anchor:
    every random stream a step reads (dropout: the global RNG; augmentation: per-item seeds) is in play."""
    recipe = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    audio = recipe["modalities"]["audio"]
    audio["args"]["dropout"] = 0.1
    audio["train_data"]["augment"] = {"speed": [0.9, 1.1], "noise_snr_db": [20.0, 40.0]}
    for modality in recipe["modalities"].values():
        modality["eval_data"] = {**modality["train_data"], "split": "eval", "augment": {}}
    recipe["eval"] = {"max_items": 20}
    recipe["checkpoint_every"] = 1
    recipe["stages"] = [
        {"name": "audio_specialist", "kind": "pretrain", "modality": "audio", "steps": STEPS[0], "batch_size": 16},
        {**recipe["stages"][0], "steps": STEPS[1]},
    ]
    return json.loads(json.dumps(recipe))  # no shared sub-dicts: YAML would write them as anchors, which recipes refuse


def bindkit(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bind", "run", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for_checkpoint(directory: Path, at_least: int, process: subprocess.Popen) -> None:
    """Until a checkpoint ``at_least`` optimizer steps into the run exists (counting over stages)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = [sum(STEPS[: c.stage_index]) + c.step for c in list_checkpoints(directory)]
        if done and max(done) >= at_least:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint {at_least} steps in under {directory}")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bitwise


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("resume")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data_root)))
    done = finish(bindkit(str(path), "--out", str(root / "whole")))
    assert done.returncode == 0, done.stderr[-3000:]
    return path, root / "whole"


def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(uninterrupted, tmp_path):
    recipe, whole = uninterrupted
    at = random.Random(os.getpid()).randint(1, sum(STEPS) - 2)  # anywhere, across the stage boundary
    run = tmp_path / "killed"
    process = bindkit(str(recipe), "--out", str(run))
    wait_for_checkpoint(run / "checkpoints", at, process)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a crash or an OOM kill
    assert process.wait() == -signal.SIGKILL
    assert not (run / "model.safetensors").exists()
    again = finish(bindkit(str(recipe), "--out", str(run)))  # without --resume: refused, nothing lost
    assert again.returncode == 2 and "checkpoints of an unfinished run: continue it with --resume" in again.stderr
    done = finish(bindkit(str(recipe), "--out", str(run), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(run, whole)
    assert json.loads((run / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    assert len(list_checkpoints(run / "checkpoints")) == 2  # keep_checkpoints
    assert not list((run / "checkpoints").glob(".*"))  # no half-written folder left behind
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" for r in resumed)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_resumes(uninterrupted, tmp_path):
    recipe, whole = uninterrupted
    run = tmp_path / "stopped"
    process = bindkit(str(recipe), "--out", str(run), "checkpoint_every=100")  # only epoch ends and the signal
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("stage0-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    done = finish(process)
    assert done.returncode == 143, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) <= 2
    assert "stopped by SIGTERM" in lines[-1] and "--resume" in lines[-1]
    done = finish(bindkit(str(recipe), "--out", str(run), "checkpoint_every=100", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(run, whole)


def test_resume_refuses_another_recipe_or_an_empty_directory(uninterrupted, tmp_path, data_root):
    recipe = parse_recipe(tiny_recipe(data_root))
    with pytest.raises(ConfigError, match="no checkpoint in"):
        run_recipe(recipe, tmp_path, show_progress=False, resume=True)
    _, whole = uninterrupted
    recipe.stages[1].optimizer.lr = 0.5
    with pytest.raises(ConfigError, match="recipe differs.*keys: stages"):
        run_recipe(recipe, whole, show_progress=False, resume=True)


# ---- NaN losses ------------------------------------------------------------------------------------
def runner_for(data_root: Path, **recipe_keys) -> StageRunner:
    data = {**tiny_recipe(data_root), **recipe_keys}
    recipe = parse_recipe(data)
    seed_everything(0)
    model = build_model(recipe)
    train_sets = {m: build_dataset(s.train_data, recipe.data_root) for m, s in recipe.modalities.items()}
    return StageRunner(model, recipe, recipe.stages[1], torch.device("cpu"), train_sets)


def test_a_nan_loss_skips_the_step_and_n_in_a_row_stop_the_run(data_root):
    runner = runner_for(data_root, max_nonfinite_steps=3)
    real_backward, calls = runner.backward, []

    def nan_on_second_step(iterators):
        calls.append(1)
        loss, parts, samples = real_backward(iterators)
        return (math.nan if len(calls) == 2 else loss), parts, samples

    runner.backward = nan_on_second_step
    snapshots = []
    runner.scheduler.step = lambda step=runner.scheduler.step: (snapshots.append(1), step())[1]
    runner.run(None, show_progress=False)
    assert runner.nonfinite_steps == 1
    assert len(snapshots) == runner.total_steps - 1  # the NaN step moved neither weights nor schedule

    runner = runner_for(data_root, max_nonfinite_steps=3)
    runner.backward = lambda iterators: (math.inf, {}, 0)
    with pytest.raises(TrainingError, match=r"NaN/inf for 3 steps in a row \(last at step 3\); last checkpoint: none"):
        runner.run(None, show_progress=False)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_step_leaving_weights_and_adamw_as_they_were(grad_clip):
    """One gradient entry NaN, then one inf, the loss finite both times: apply_update (the trainer's and the bench's
    one update) steps neither time, so the weights, the AdamW moments and step count, and the schedule stay bitwise
    what the last good step left, and the bad gradient is cleared."""
    from bind import create_encoder
    from bind.model import BindModel
    from bind.recipe import OptimSpec
    from bind.train.optim import apply_update, build_optimizer

    torch.manual_seed(0)
    encoder = create_encoder("digits_cnn", width=4, embed_dim=8)
    model = BindModel({"image": encoder}, "image")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, OptimSpec(grad_clip=grad_clip, warmup_steps=2), total_steps=10)
    batch = encoder.collate([encoder.preprocess(x) for x in encoder.example_inputs(4, seed=0)])

    def step(bad: float | None = None) -> tuple[float, bool]:
        loss = (model["image"](batch) @ torch.ones(8)).square().mean()
        loss.backward()
        if bad is not None:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = bad  # one entry of one gradient
        return apply_update(model, params, optimizer, scheduler, loss.item(), grad_clip)

    assert step()[1]  # AdamW holds moments from here on
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {
        (i, key): value.clone() for i, state in enumerate(optimizer.state.values()) for key, value in state.items()
    }
    schedule, lrs = scheduler.state_dict(), [group["lr"] for group in optimizer.param_groups]
    assert {key for _, key in moments} == {"step", "exp_avg", "exp_avg_sq"}
    for bad in (math.nan, math.inf):
        grad_norm, stepped = step(bad)
        assert not stepped and not math.isfinite(grad_norm)
        for name, p in model.named_parameters():
            assert torch.equal(p, weights[name]) and p.grad is None, name
        for (i, key), value in moments.items():
            assert torch.equal(list(optimizer.state.values())[i][key], value), key
        assert scheduler.state_dict() == schedule and [group["lr"] for group in optimizer.param_groups] == lrs
    assert step()[1]  # the next good batch steps again
    assert not all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


# ---- bad items inside a dataset -------------------------------------------------------------------
def image_manifest(tmp_path: Path, n: int, corrupt: set[int]) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image,text,label"]
    for i in range(n):
        file = tmp_path / f"img{i}.png"
        if i in corrupt:
            file.write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a PNG header, then garbage
        else:
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(file)
        rows.append(f"{file.name},digit {i % 4},{i % 4}")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def manifest_recipe(manifest: Path, **keys) -> dict:
    data = lambda column: {"source": "manifest", "args": {"path": str(manifest), "column": column}}  # noqa: E731
    return {
        "anchor_modality": "image",
        "embed_dim": 8,
        "device": "cpu",
        "checkpoint_every": None,
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": data("image")},
        },
        "stages": [{"name": "image", "kind": "pretrain", "modality": "image", "steps": 3, "batch_size": 8}],
        **keys,
    }


def test_bad_items_are_skipped_counted_and_reported(tmp_path):
    manifest = image_manifest(tmp_path, 40, corrupt={3, 17})
    recipe = parse_recipe(manifest_recipe(manifest, max_bad_fraction=0.1))
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert steps[-1]["bad_items"] in (1, 2)  # those the sampled batches met; never silently dropped
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_on_bad_item_fail_and_too_many_bad_items_stop_with_the_files(tmp_path):
    manifest = image_manifest(tmp_path, 40, corrupt=set(range(0, 40, 3)))
    recipe = parse_recipe(manifest_recipe(manifest, on_bad_item="fail"))
    with pytest.raises(DataError, match=r"img\d+\.png.*on_bad_item: fail"):
        run_recipe(recipe, tmp_path / "a", show_progress=False)
    recipe = parse_recipe(manifest_recipe(manifest, max_bad_fraction=0.05))
    with pytest.raises(DataError, match=r"(?s)items are bad, more than max_bad_fraction=0\.05.*img\d+\.png"):
        run_recipe(recipe, tmp_path / "b", show_progress=False)


# ---- where each second goes ------------------------------------------------------------------------------
def test_a_slow_loader_shows_as_data_wait_not_compute(data_root, tmp_path):
    from bind.train.monitor import MetricsLog

    runner = runner_for(data_root)
    real_iterators = runner.data.iterators

    def slow_iterators():
        def slow(iterator):
            for batch in iterator:
                time.sleep(0.05)  # a loader that cannot keep up
                yield batch

        return {m: slow(it) for m, it in real_iterators().items()}

    runner.data.iterators = slow_iterators
    runner.stage.log_every = 1
    runner.run(MetricsLog(tmp_path / "metrics.jsonl"), show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps, (summary,) = [r for r in records if "step" in r], [r for r in records if r.get("event") == "stage_done"]
    assert len(steps) == runner.total_steps
    for r in steps:
        assert 0.05 <= r["data_s"] <= r["batch_s"] and 0 < r["data_wait_fraction"] <= 1
    assert summary["steps"] == runner.total_steps and summary["data_wait_s"] >= 0.05 * runner.total_steps
    assert summary["compute_s"] + summary["data_wait_s"] == pytest.approx(summary["seconds"], abs=2e-3)
    assert summary["data_wait_s"] > summary["compute_s"]  # 50 ms per step waiting against a tiny model's step
