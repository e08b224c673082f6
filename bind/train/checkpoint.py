"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``RUN/checkpoints/stage{i}-step{n}/`` holding

* ``model.safetensors`` + ``config.json`` (:meth:`BindModel.save_pretrained`: loadable as a model);
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (AdamW moments and step counts);
* ``rng.safetensors``: the torch (CPU and CUDA) and numpy random states, of every rank (``rank{r}.`` keys
  beyond rank 0: each rank draws its own dropout masks);
* ``trainer_state.json``: stage and step, the optimizer's hyperparameters, the scheduler, the
  Python random state, the recipe, and the bad-item and non-finite-loss counts;
* ``MANIFEST.json``, written last: the size and SHA-256 of every other file.

No pickle: tensors go to safetensors, the rest to JSON. The data position needs no state of its
own: batches are a pure function of ``(seed, epoch, index)`` (:class:`bind.data.pairs.EpochSampler`),
so the step count says where each loader is. There is no gradient scaler to save: bf16 autocast
needs none (fp16 is not offered).

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into
place in one step and the parent folder fsynced: a crash leaves the previous checkpoints intact
and never a half-written one under a checkpoint's name. The newest ``keep`` are kept; pruning
deletes an old checkpoint's manifest first (and fsyncs that), so a prune cut short never leaves a
half-deleted folder that passes for complete.

A checkpoint is *complete* (:func:`list_checkpoints`) when its manifest exists, and *good*
(:func:`verify_checkpoint`) when every file has the size and hash its manifest says and every JSON
file parses. ``--resume`` takes the newest good one (:func:`newest_good_checkpoint`) and logs a
warning for each newer one it passes over (a truncated file, a disk error, a deleted manifest).
A checkpoint without a manifest is never resumed from, even if its files might load: it was either
written by a bindkit older than the manifest or cut short while being pruned, and telling these
apart would mean trusting files nothing vouches for (continue an older run with the bindkit that
started it, or start it over). Such folders still count for the "unfinished run" checks of
:mod:`bind.train.trainer`, and are pruned once older than the kept checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from ..errors import DataError
from ..model import BindModel
from ..model_files import load_weights as load_model_weights

FORMAT_VERSION = 1
NAME = re.compile(r"^stage(\d+)-step(\d+)$")
MANIFEST = "MANIFEST.json"
REQUIRED = ("config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")
NO_MANIFEST = "no manifest (written by an older bindkit or cut short)"

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    path: Path
    stage_index: int
    step: int  # optimizer steps done in that stage

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "trainer_state.json").read_text())

    @property
    def order(self) -> tuple[int, int]:
        return self.stage_index, self.step

    def modified_ns(self) -> int:
        """When the newest file in it was written (the folder's own time if it holds none)."""
        times = [p.stat().st_mtime_ns for p in self.path.rglob("*") if p.is_file()]
        return max(times, default=self.path.stat().st_mtime_ns)

    def ends_its_run(self) -> bool:
        """Whether this is the last step of the last stage of the recipe it was trained with."""
        try:
            state = self.state
            return self.stage_index == len(state["recipe"]["stages"]) - 1 and self.step == state["total_steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return False


def checkpoint_path(directory: Path, stage_index: int, step: int) -> Path:
    return directory / f"stage{stage_index}-step{step:07d}"


def list_checkpoints(directory: Path, complete: bool = True) -> list[Checkpoint]:
    """Checkpoints under ``directory``, oldest first: those with a manifest, or all (``complete=False``)."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = NAME.match(path.name)
            if match and path.is_dir() and (not complete or (path / MANIFEST).is_file()):
                found.append(Checkpoint(path, int(match[1]), int(match[2])))
    return sorted(found, key=lambda c: c.order)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint (not verified: see :func:`newest_good_checkpoint`)."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def verify_checkpoint(checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or ``None`` when every file matches its manifest."""
    path = checkpoint.path
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return NO_MANIFEST
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} cannot be read ({err})"
    if not isinstance(files, dict) or not set(REQUIRED) <= set(files):
        return f"{MANIFEST} does not list all of {', '.join(REQUIRED)}"
    for name, expected in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} lists {name!r}, outside the checkpoint"
        try:
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name}: {size} bytes, the manifest says {expected['size']}"
            if _sha256(file) != expected["sha256"]:
                return f"{name}: its SHA-256 differs from the manifest's"
            if name.endswith(".json"):
                json.loads(file.read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
            return f"{name} cannot be read ({err})"
        except (KeyError, TypeError):
            return f"{MANIFEST}: the entry of {name} has no size and sha256"
    return None


def newest_good_checkpoint(directory: Path) -> tuple[Checkpoint | None, list[tuple[Checkpoint, str]]]:
    """The newest checkpoint that verifies, and the newer ones passed over with the reason (each logged)."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(directory, complete=False)):
        reason = verify_checkpoint(checkpoint)
        if reason is None:
            return checkpoint, skipped
        log.warning("%s: skipped for resuming: %s", checkpoint.path, reason)
        skipped.append((checkpoint, reason))
    return None, skipped


RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def rng_state() -> RngState:
    """Every random state a training step of this process reads: tensors for safetensors, the rest for JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():  # this process's device
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [kind, pos, has_gauss, gauss], "python": [version, list(internal), py_gauss]}
    return tensors, meta


def all_rng_states(world_size: int) -> list[RngState]:
    """Every rank's :func:`rng_state`, in rank order, on every rank (each rank seeds ``seed + rank`` and so
    draws its own dropout masks; a checkpoint keeps them all). Call on all ranks at once."""
    if world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())  # the job's own processes: trusted, small
    return states


def _rng_files(states: list[RngState]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rank 0's states under their own keys (as a one-process run writes them), rank r's under ``rank{r}.``."""
    tensors, meta = dict(states[0][0]), dict(states[0][1])
    for rank, (rank_tensors, rank_meta) in enumerate(states[1:], start=1):
        tensors.update({f"rank{rank}.{key}": value for key, value in rank_tensors.items()})
        meta.setdefault("ranks", {})[str(rank)] = rank_meta
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int = 0) -> None:
    """Restore this process's random states: ``rank``'s, from a checkpoint of every rank's."""
    if rank:
        prefix = f"rank{rank}."
        if str(rank) not in meta.get("ranks", {}):
            log.warning(
                "the checkpoint holds no random state for rank %d (written by fewer ranks): this rank's dropout "
                "masks will differ from an uninterrupted run's",
                rank,
            )
            return
        tensors = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        meta = meta["ranks"][str(rank)]
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
    rng: list[RngState] | None = None,
) -> Path:
    """Write checkpoint ``stage{stage_index}-step{step}`` atomically; keep the newest ``keep``. ``rng``: every
    rank's random states (:func:`all_rng_states`); default this process's."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, stage_index, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        model.save_pretrained(tmp)
        optimizer_tensors, optimizer_meta = _optimizer_split(optimizer)
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = _rng_files(rng or [rng_state()])
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
        _write_manifest(tmp)  # last: a manifest vouches for files already written
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
    # everything older than the newest `keep` complete ones goes, manifest-less leftovers included
    oldest_kept = list_checkpoints(directory)[-keep:][0].order
    for old in list_checkpoints(directory, complete=False):
        if old.order < oldest_kept and old.path != final:
            remove_checkpoint(old.path)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its manifest first: a deletion cut short leaves an incomplete folder."""
    try:
        (path / MANIFEST).unlink()
        _fsync_dir(path)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def load_weights(checkpoint: Checkpoint, model: BindModel) -> None:
    """The checkpoint's weights into ``model`` (before the stage is set up: its feature caches need them)."""
    load_model_weights(model, checkpoint.path / "model.safetensors", str(next(model.parameters()).device))


def load_training_state(
    checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> dict[str, Any]:
    """Restore optimizer, scheduler and ``rank``'s random states in place; returns ``trainer_state.json``."""
    path = checkpoint.path
    try:
        state = checkpoint.state
        optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"], rank)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: checkpoint cannot be read ({err}); delete it to resume from the one before") from err
    return state


def clean_partial(directory: Path) -> None:
    """Remove temporary folders a killed run left behind (never a complete checkpoint)."""
    if directory.is_dir():
        for path in directory.glob(".stage*"):
            shutil.rmtree(path, ignore_errors=True)


def _write_manifest(root: Path) -> None:
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / MANIFEST
    }
    (root / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


class CheckpointWriter:
    """Writes the checkpoints of one stage of a run (main rank only), remembering the newest.

    ``recipe`` (the resolved recipe as plain data) goes into every checkpoint's ``trainer_state.json``,
    so ``--resume`` can refuse a changed recipe."""

    def __init__(self, directory: Path, recipe: dict[str, Any], stage_index: int, keep: int) -> None:
        self.directory, self.recipe, self.stage_index, self.keep = directory, recipe, stage_index, keep
        self.last: Path | None = None

    def save(
        self,
        step: int,
        model: BindModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: dict[str, Any],
        rng: list[RngState] | None = None,
    ) -> Path:
        """Checkpoint ``step`` with ``state`` (stage name, total steps, counters) beside the weights and optimizer,
        and ``rng``, every rank's random states (default: this process's)."""
        extra = {"recipe": self.recipe, **state}
        self.last = save_checkpoint(
            self.directory, model, optimizer, scheduler, self.stage_index, step, extra, keep=self.keep, rng=rng
        )
        return self.last
