"""Each rank draws its own random numbers (seed + rank, as open_clip seeds), and a checkpoint keeps every rank's
random state, so a resumed multi-process run draws the dropout masks an uninterrupted one draws."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import spawn_gloo
from safetensors.torch import load_file

from bind import create_encoder
from bind.bench.ddp import check_recipe
from bind.distributed import Dist
from bind.model import BindModel
from bind.recipe import OptimSpec
from bind.train.checkpoint import (
    Checkpoint,
    all_rng_states,
    checkpoint_path,
    list_checkpoints,
    load_training_state,
    save_checkpoint,
)
from bind.train.optim import build_optimizer
from bind.train.trainer import seed_everything

DROPOUT = 0.5


def _mask(n: int = 256) -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(n), DROPOUT) > 0


def _worker(rank: int, dist: Dist, out: str) -> None:
    seed_everything(7, dist.rank)
    first = _mask()
    model = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=8)}, "image")
    optimizer, scheduler = build_optimizer(list(model.parameters()), OptimSpec(), total_steps=10)
    states = all_rng_states(dist.world_size)  # on every rank at once, as the trainer calls it
    path = checkpoint_path(Path(out), 0, 1)
    if dist.is_main:
        save_checkpoint(Path(out), model, optimizer, scheduler, 0, 1, {}, rng=states)
    torch.distributed.barrier()
    after_save = _mask()  # what an uninterrupted run draws next
    _mask()  # the process moves on ...
    load_training_state(Checkpoint(path, 0, 1), optimizer, scheduler, dist.rank)  # ... and is resumed
    after_resume = _mask()
    masks = [torch.empty(256, dtype=torch.bool) for _ in range(dist.world_size)]
    torch.distributed.all_gather(masks, first)
    if dist.is_main:
        torch.save({"masks": masks}, Path(out) / "masks.pt")
    torch.save({"after_save": after_save, "after_resume": after_resume}, Path(out) / f"rank{rank}.pt")


def test_ranks_draw_different_masks_and_a_checkpoint_restores_each_ranks_own_state():
    with tempfile.TemporaryDirectory() as out:
        spawn_gloo(_worker, out)
        masks = torch.load(Path(out) / "masks.pt")["masks"]
        assert not torch.equal(masks[0], masks[1])  # seed + rank: rank 1's dropout is not rank 0's
        torch.manual_seed(7 + 1)
        assert torch.equal(masks[1], _mask())  # rank 1 seeded seed + 1
        for rank in range(2):
            drawn = torch.load(Path(out) / f"rank{rank}.pt")
            assert torch.equal(drawn["after_resume"], drawn["after_save"]), rank
        (folder,) = list_checkpoints(Path(out))
        stored = load_file(str(folder.path / "rng.safetensors"))
        assert {"torch", "rank1.torch"} <= set(stored) and not torch.equal(stored["torch"], stored["rank1.torch"])


@pytest.mark.slow
def test_a_two_process_run_with_dropout_resumed_mid_stage_ends_with_the_same_weights(tmp_path, data_root):
    """The whole run, then the same run resumed from its step-2 checkpoint: bitwise the same model. Had a
    checkpoint kept rank 0's random state only, rank 1 would resume with rank 0's dropout masks."""
    recipe = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    recipe["modalities"]["audio"]["args"]["dropout"] = DROPOUT
    recipe["stages"][0]["steps"] = 4
    recipe["checkpoint_every"] = 1
    recipe["keep_checkpoints"] = 10
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    run = [sys.executable, "-m", "bind", "run", str(path), "--nproc", "2", "--no-progress"]
    whole = tmp_path / "whole"
    done = subprocess.run([*run, "--out", str(whole)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    (resumed / "model.safetensors").unlink()
    for checkpoint in list_checkpoints(resumed / "checkpoints"):
        if checkpoint.step > 2:
            shutil.rmtree(checkpoint.path)
    done = subprocess.run([*run, "--out", str(resumed), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
