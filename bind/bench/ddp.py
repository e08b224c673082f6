"""``bindkit bench ddp``: one training step on N gloo processes against one process on the same global batch.

Both sides run the trainer's own step (:meth:`bind.train.stage.StageRunner.backward`): the ranks draw
their slices of the global batch, gather embeddings with gradient, compute the loss (optionally
local rows against global columns, optionally GradCache-chunked) and average gradients. The
figures are the largest differences in loss and in any parameter's gradient: 0 up to float
rounding when data parallelism is exact.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..distributed import (
    SINGLE_PROCESS,
    Dist,
    barrier,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)


def check_recipe(data_root: str | None, batch_size: int, local_loss: bool, chunk_size: int | None) -> dict[str, Any]:
    """A tiny bind recipe on the digits data: a frozen image anchor and a small audio transformer that
    trains end to end (no BatchNorm and no dropout, whose batch-dependence data parallelism changes)."""
    return {
        "seed": 0,
        "device": "cpu",
        "anchor_modality": "image",
        "embed_dim": 16,
        "data_root": data_root,
        "modalities": {
            "image": {
                "encoder": "digits_cnn",
                "args": {"width": 4},
                "train_data": {"source": "mnist", "split": "train", "args": {"limit": 256}},
            },
            "audio": {
                "encoder": "audio_vit",
                "args": {"n_mels": 32, "clip_seconds": 0.5, "width": 32, "depth": 1, "heads": 2},
                "train_data": {"source": "fsdd", "split": "train", "args": {"eval_speakers": ["nicolas"], "limit": 64}},
            },
        },
        "stages": [
            {
                "name": "bind",
                "kind": "bind",
                "pairs": {"audio": {"batch_size": batch_size}},
                "steps": 1,
                "local_loss": local_loss,
                "chunk_size": chunk_size,
            }
        ],
    }


def step_gradients(recipe_data: dict[str, Any], dist: Dist = SINGLE_PROCESS) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the (rank-averaged) gradient of every trained parameter after one step's backward."""
    from ..data import build_dataset
    from ..recipe import parse_recipe
    from ..train.stage import StageRunner
    from ..train.trainer import build_model, seed_everything

    recipe = parse_recipe(recipe_data, "<ddp check>")
    seed_everything(recipe.seed)
    model = build_model(recipe)
    broadcast_parameters(model)
    train_sets = {m: build_dataset(s.train_data, recipe.data_root) for m, s in recipe.modalities.items()}
    runner = StageRunner(model, recipe, recipe.stages[0], torch.device("cpu"), train_sets, dist)
    model.train()
    loss, _, _ = runner.backward(runner.data.iterators())
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, recipe_data: dict[str, Any], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        loss, grads = step_gradients(recipe_data, dist)
        if dist.is_main:
            save_file(grads, str(Path(out) / "grads.safetensors"), metadata={"loss": repr(float(loss))})
        barrier()  # rank 0 hosts the store: nobody leaves while another still talks to it
    finally:
        shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_with_single_process(recipe_data: dict[str, Any], nproc: int = 2) -> dict[str, Any]:
    """Run one step in this process and on ``nproc`` spawned gloo processes; the differences."""
    from safetensors import safe_open

    single_loss, single = step_gradients(recipe_data)
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(3):  # the free port we picked can be taken before rank 0 binds it: pick again
            try:
                torch.multiprocessing.spawn(_worker, args=(nproc, _free_port(), recipe_data, tmp), nprocs=nproc)
                break
            except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException):
                if attempt == 2:
                    raise
        multi = load_file(str(Path(tmp) / "grads.safetensors"))
        with safe_open(str(Path(tmp) / "grads.safetensors"), "pt") as f:
            multi_loss = float(f.metadata()["loss"])
    if set(multi) != set(single):
        raise RuntimeError(f"different parameters got gradients: {sorted(set(multi) ^ set(single))}")
    return {
        "max_grad_diff": max((single[k] - multi[k]).abs().max().item() for k in single),
        "max_grad": max(g.abs().max().item() for g in single.values()),
        "loss_diff": abs(single_loss - multi_loss),
        "loss": single_loss,
        "parameters_compared": len(single),
    }


def bench_ddp(nproc: int = 2, batch_size: int = 32, data_root: str | None = None) -> dict[str, Any]:
    """Full loss, local loss, and local loss with GradCache chunks, each against one process."""
    start = time.perf_counter()
    result: dict[str, Any] = {"nproc": nproc, "backend": "gloo", "global_batch": batch_size}
    variants = {"global": (False, None), "local_loss": (True, None), "local_loss_chunked": (True, batch_size // 4)}
    for name, (local_loss, chunk_size) in variants.items():
        recipe = check_recipe(data_root, batch_size, local_loss, chunk_size)
        result[name] = compare_with_single_process(recipe, nproc)
    result["max_grad_diff"] = max(result[name]["max_grad_diff"] for name in variants)
    result["seconds"] = time.perf_counter() - start
    return result
