"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``RUN/checkpoints/stage{i}-step{n}/`` holding

* ``model.safetensors`` + ``config.json`` (:meth:`BindModel.save_pretrained`: loadable as a model);
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (AdamW moments and step counts);
* ``rng.safetensors``: the torch (CPU and CUDA) and numpy random states;
* ``trainer_state.json``: stage and step, the optimizer's hyperparameters, the scheduler, the
  Python random state, the recipe, and the bad-item and non-finite-loss counts.

No pickle: tensors go to safetensors, the rest to JSON. The data position needs no state of its
own: batches are a pure function of ``(seed, epoch, index)`` (:class:`bind.data.pairs.EpochSampler`),
so the step count says where each loader is. There is no gradient scaler to save: bf16 autocast
needs none (fp16 is not offered).

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into
place in one step and the parent folder fsynced: a crash leaves the previous checkpoints intact
and never a half-written one under a checkpoint's name. The newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import DataError
from .model import BindModel, _load_weights

FORMAT_VERSION = 1
NAME = re.compile(r"^stage(\d+)-step(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    stage_index: int
    step: int  # optimizer steps done in that stage

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``directory``, oldest first."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = NAME.match(path.name)
            if match and (path / "trainer_state.json").is_file():
                found.append(Checkpoint(path, int(match[1]), int(match[2])))
    return sorted(found, key=lambda c: (c.stage_index, c.step))


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a training step reads: tensors for safetensors, the rest for JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if (
        torch.cuda.is_available()
    ):  # this process's device: under torchrun every rank's advances in lockstep with rank 0's
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [kind, pos, has_gauss, gauss], "python": [version, list(internal), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])  # into the current device (each rank's own)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: BindModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stage_index: int,
    step: int,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``stage{stage_index}-step{step}`` atomically; keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"stage{stage_index}-step{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        model.save_pretrained(tmp)
        optimizer_tensors, optimizer_meta = _optimizer_split(optimizer)
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {
            "format_version": FORMAT_VERSION,
            "stage_index": stage_index,
            "step": step,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "rng": rng_meta,
            **extra,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        _fsync_tree(tmp)
        if final.exists():  # the same step written again (a resumed run): hide the old one in one rename first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=directory))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        if old.path != final:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def load_weights(checkpoint: Checkpoint, model: BindModel) -> None:
    """The checkpoint's weights into ``model`` (before the stage is set up: its feature caches need them)."""
    _load_weights(model, checkpoint.path / "model.safetensors", str(next(model.parameters()).device))


def load_training_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and random states in place; returns ``trainer_state.json``."""
    path = checkpoint.path
    try:
        state = checkpoint.state
        optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: checkpoint cannot be read ({err}); delete it to resume from the one before") from err
    return state


def clean_partial(directory: Path) -> None:
    """Remove temporary folders a killed run left behind (never a complete checkpoint)."""
    if directory.is_dir():
        for path in directory.glob(".stage*"):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
