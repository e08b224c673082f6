"""The training loop: specialist pretraining and anchor binding, one loop a reader can follow.

``run_recipe`` builds the model from a recipe, runs its stages in order, saves the model and
evaluates it. A stage is either

* ``pretrain``: one modality learns on its own with labels (SupCon, or the MNIST lesson's pairwise
  cosine loss), to give the anchor (or any tower) a good space before binding; or
* ``bind``: the anchor is frozen and each paired modality is pulled onto it with InfoNCE; every
  step takes one batch per paired modality and sums their losses with the recipe's weights.

A stage's step and loop are :class:`bind.train.stage.StageRunner`'s; this module builds the model, resumes
from a checkpoint, starts trunks from another modality's (``init_from``) and evaluates at the end.

The run directory has one writer: ``run_recipe`` holds its lock (:mod:`bind.train.runlock`) for the whole
run, taken before anything there is read or changed, so a second run or ``--resume`` on the same
``--out`` is refused instead of overwriting checkpoints. A fresh run replaces a finished run's
checkpoints, but refuses when they may hold unfinished work: no ``model.safetensors``, or a
checkpoint newer than it, or a newest checkpoint that is not the last step of its recipe.
``--resume`` continues from the newest checkpoint that verifies against its manifest
(:func:`bind.train.checkpoint.newest_good_checkpoint`), warning about each newer one it skips.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..budget import MemoryCheck, memory_budget
from ..data import build_dataset
from ..distributed import (
    Dist,
    barrier,
    broadcast_parameters,
    init_distributed,
    resolve_device,
    shutdown_distributed,
    sync_batchnorm_stats,
)
from ..errors import ConfigError, DataError, InputError
from ..evaluate import evaluate_all
from ..hub import write_model_card
from ..lora import apply_lora
from ..model import BindModel
from ..recipe import Recipe, StageSpec, changed_keys, load_recipe, recipe_to_dict, tower_freeze
from ..registry import create_encoder
from ..safe_io import write_atomic
from .checkpoint import (
    Checkpoint,
    CheckpointWriter,
    checkpoint_path,
    clean_partial,
    list_checkpoints,
    load_training_state,
    load_weights,
    newest_good_checkpoint,
)
from .compile import to_channels_last
from .monitor import MetricsLog, StopFlag
from .runlock import run_lock
from .stage import StageRunner
from .warm_start import init_from_encoder

log = logging.getLogger(__name__)


# ---- building blocks -------------------------------------------------------------------------------
def seed_everything(seed: int, rank: int = 0) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) from ``seed + rank``, as open_clip seeds: each rank
    draws its own dropout and DropPath masks. What must agree across ranks does not read these: the weights
    start as rank 0's (:func:`prepare_model`), data order and augmentation use generators seeded by ``seed``."""
    seed = (seed + rank) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(precision: str, device: torch.device) -> None:
    """CUDA's math settings for a run: TF32 tensor-core matmuls and convolutions unless ``precision`` is
    ``fp32`` (exact float32), and ``cudnn.benchmark`` (each new input shape times the convolution algorithms
    once, then uses the fastest: a win for fixed-size images). Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def prepare_model(recipe: Recipe, device: torch.device) -> BindModel:
    """The recipe's model on ``device`` as training uses it: built (:func:`build_model`), moved, in the
    channels-last memory format where the recipe asks and a module takes it, and rank 0's weights on every rank."""
    model = build_model(recipe).to(device)
    if recipe.channels_last:
        to_channels_last(model)
    broadcast_parameters(model)
    return model


def build_model(recipe: Recipe) -> BindModel:
    """The recipe's towers, each counted on the meta device against the memory budget before it is built."""
    memory = MemoryCheck(memory_budget(recipe.device))
    encoders = {}
    for modality, spec in recipe.modalities.items():
        kwargs = {"embed_dim": recipe.embed_dim, **spec.args}
        tower = f"modalities.{modality}"
        argument_key = lambda arg, tower=tower: "embed_dim" if arg == "embed_dim" else f"{tower}.args.{arg}"  # noqa: E731
        try:
            memory.admit(spec.encoder, kwargs, recipe.source, tower, argument_key)
            encoder = create_encoder(spec.encoder, **kwargs)
        except (ConfigError, DataError, InputError) as err:  # the factory knows what; the recipe key says where
            if type(err) not in (ConfigError, DataError, InputError):  # subclasses carry more than a message
                raise
            key, _, rest = str(err).partition(": ")  # "pretrained: ..." names the argument it is about
            where = f"modalities.{modality}.args.{key}: {rest}" if key in spec.args else f"modalities.{modality}: {err}"
            raise type(err)(f"{recipe.source}: {where}") from None
        encoder.freeze(*tower_freeze(recipe, modality))
        if spec.lora is not None:  # after freeze: the adapters, the head and any unfrozen blocks train
            lora = spec.lora
            try:
                apply_lora(encoder, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
            except ConfigError as err:
                raise ConfigError(f"{recipe.source}: modalities.{modality}.{err}") from None
        encoders[modality] = encoder
    model = BindModel(encoders, recipe.anchor_modality)
    for modality, spec in recipe.modalities.items():
        if spec.share_trunk_with:
            model.share_trunk(modality, spec.share_trunk_with, "share")
    return model


# ---- the whole recipe -------------------------------------------------------------------------------
def run_recipe(
    recipe: Recipe | str | os.PathLike[str], out_dir: str | Path, show_progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Train every stage of ``recipe`` (a :class:`~bind.recipe.Recipe` or a recipe file), save the model into
    ``out_dir`` and evaluate it; returns what ``out_dir/eval.json`` holds.

    ``resume`` continues from the newest checkpoint in ``out_dir/checkpoints`` with the same weights,
    optimizer, scheduler, random states and data position, so the run ends as if never stopped.
    Under torchrun (``WORLD_SIZE`` > 1) every process runs this; rank 0 writes the run directory and
    holds its lock. Raises :class:`bind.train.runlock.RunDirectoryBusy` while another run writes there.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    device = resolve_device(recipe.device)
    dist = init_distributed(device.type, recipe.distributed_timeout_s)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if resume and not checkpoint_dir.is_dir():  # refused before the lock would create the folder
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir}; run without --resume to start from scratch")
    with ExitStack() as held:  # rank 0 holds the run directory's lock until the run returns
        resume_from = _claim_run_directory(recipe, out_dir, resume, dist, device, held)
        return _run_locked(recipe, out_dir, device, dist, show_progress, resume_from)


def _claim_run_directory(
    recipe: Recipe, out_dir: Path, resume: bool, dist: Dist, device: torch.device, held: ExitStack
) -> Checkpoint | None:
    """Rank 0 takes the lock (before anything in ``out_dir`` is touched), then picks the checkpoint to resume
    from or clears a finished run's; every rank learns the outcome, so a refusal stops each with one line."""
    checkpoint_dir = out_dir / "checkpoints"
    checkpoint = None
    if dist.is_main:
        try:
            held.enter_context(run_lock(out_dir))
            if resume:
                checkpoint = _checkpoint_to_resume(recipe, checkpoint_dir)
            else:
                _clear_finished_checkpoints(out_dir, checkpoint_dir)
        except Exception:
            if dist.enabled:  # the other ranks stop too, rather than wait for rank 0 forever
                _tell_every_rank(True, None, checkpoint_dir, device)
            raise
    if not dist.enabled:
        return checkpoint
    failed, checkpoint = _tell_every_rank(False, checkpoint, checkpoint_dir, device)
    if failed:
        raise ConfigError(f"{out_dir}: rank 0 could not start the run there (its message says why)")
    return checkpoint


def _run_locked(
    recipe: Recipe, out_dir: Path, device: torch.device, dist: Dist, show_progress: bool, resume_from: Checkpoint | None
) -> dict[str, Any]:
    """:func:`run_recipe`'s work, with rank 0 holding the run directory's lock."""
    checkpoint_dir = out_dir / "checkpoints"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").unlink(missing_ok=True)  # an earlier run's figures are not this run's
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    seed_everything(recipe.seed, dist.rank)
    configure_backends(recipe.precision, device)
    model = prepare_model(recipe, device)
    if resume_from is not None:
        load_weights(resume_from, model)
    metrics = MetricsLog(out_dir / "metrics.jsonl", recipe.tensorboard) if dist.is_main else None
    train_sets = {
        m: build_dataset(s.train_data, recipe.data_root)
        for m, s in recipe.modalities.items()
        if s.train_data is not None
    }
    # modalities whose trunk was already started from another's (init_from): before the checkpoint, all that trained
    initialised = set()
    if resume_from is not None:
        initialised = {m for stage in recipe.stages[: resume_from.stage_index + 1] for m in _trained_in(stage)}
    with StopFlag() as stop:
        for index, stage in enumerate(recipe.stages):
            if resume_from is not None and index < resume_from.stage_index:
                continue  # finished before the checkpoint; its result is in the weights
            log.info("stage %s (%s)", stage.name, stage.kind)
            for modality in _trained_in(stage) - initialised:
                source = recipe.modalities[modality].init_from
                if source is not None:
                    init_from_encoder(model[modality], model[source])
                initialised.add(modality)
            runner = StageRunner(model, recipe, stage, device, train_sets, dist, show_progress)
            start = 0
            if resume_from is not None and index == resume_from.stage_index:
                runner.restore_counters(load_training_state(resume_from, runner.optimizer, runner.scheduler, dist.rank))
                start = resume_from.step
                runner.seek(start)
                if metrics is not None:
                    metrics.write({"stage": stage.name, "event": "resumed", "from_step": start})
                log.info("resuming stage %s at step %d from %s", stage.name, start, resume_from.path)
            writer = (
                CheckpointWriter(checkpoint_dir, recipe_to_dict(recipe), index, recipe.keep_checkpoints)
                if dist.is_main
                else None
            )
            runner.run(metrics, writer, show_progress, start_step=start, stop=stop)
    sync_batchnorm_stats(model)  # every rank's running statistics, not rank 0's alone, evaluated and saved
    model.eval()
    model.class_names = _class_names(recipe, train_sets)
    if dist.is_main:  # saved before evaluating: a failing evaluation loses no training
        model.save_pretrained(out_dir)
    results = evaluate_all(model, recipe, device, dist, show_progress)
    if dist.is_main:
        metrics.write({"stage": "eval", **results})
        write_atomic(out_dir / "eval.json", json.dumps(results, indent=2).encode())
        write_model_card(out_dir, model.config())  # now with the figures
    barrier()  # rank 0 hosts the process group's store: everyone is done before anyone leaves
    shutdown_distributed()
    return results


def _class_names(recipe: Recipe, train_sets: dict[str, Any]) -> list[str] | None:
    """What label i meant in training (the anchor's data first), saved with the model for evaluating other data."""
    for modality in sorted(train_sets, key=lambda m: m != recipe.anchor_modality):
        names = train_sets[modality].class_names
        if names:
            return [str(n) for n in names]
    return None


def _trained_in(stage: StageSpec) -> set[str]:
    """The modalities a stage trains (the anchor of a bind stage is frozen)."""
    return {stage.modality} if stage.kind == "pretrain" else set(stage.pairs)


def _clear_finished_checkpoints(out_dir: Path, checkpoint_dir: Path) -> None:
    """Before a fresh run: delete a finished run's checkpoints (they would mix with the new ones); refuse
    when they may be an unfinished run's work (main rank, under the lock)."""
    checkpoints = list_checkpoints(checkpoint_dir, complete=False)  # manifest-less ones are someone's work too
    if not checkpoints:
        clean_partial(checkpoint_dir)  # what a run killed before its first checkpoint left
        return
    model = out_dir / "model.safetensors"
    if not model.is_file():
        raise ConfigError(
            f"{checkpoint_dir} holds the checkpoints of an unfinished run: continue it with --resume, "
            "or give another --out (or delete that folder) to start over"
        )
    # the finished run saved its model after its last checkpoint; a later run that has not finished did not
    model_written = model.stat().st_mtime_ns
    newer = [c.path.name for c in checkpoints if c.modified_ns() > model_written]
    if newer or not checkpoints[-1].ends_its_run():
        why = f"{newer[-1]} was written after {model}" if newer else f"{checkpoints[-1].path.name} ends no run"
        raise ConfigError(
            f"{checkpoint_dir} holds the checkpoints of an unfinished run ({why}): continue it with --resume, "
            "or give another --out (or delete that folder) to start over"
        )
    shutil.rmtree(checkpoint_dir)


def _checkpoint_to_resume(recipe: Recipe, directory: Path) -> Checkpoint:
    """The newest checkpoint that verifies, checked against the recipe it must continue (main rank, under the lock)."""
    clean_partial(directory)
    checkpoint, skipped = newest_good_checkpoint(directory)
    if checkpoint is None and skipped:
        reasons = "; ".join(f"{c.path.name}: {reason}" for c, reason in skipped)
        raise DataError(
            f"--resume: no checkpoint in {directory} is intact ({reasons}); "
            "delete that folder and run without --resume to start over"
        )
    if checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {directory}; run without --resume to start from scratch")
    changed = changed_keys(checkpoint.state.get("recipe", {}), recipe)
    if changed:
        raise ConfigError(
            f"--resume: the recipe differs from the one {checkpoint.path} was trained with (keys: {', '.join(changed)});"
            " resume with the same recipe and overrides, or start a new run directory"
        )
    return checkpoint


def _tell_every_rank(
    failed: bool, checkpoint: Checkpoint | None, directory: Path, device: torch.device
) -> tuple[bool, Checkpoint | None]:
    """Rank 0's outcome on every rank: only rank 0 verifies, so all resume from the same checkpoint."""
    order = checkpoint.order if checkpoint is not None else (-1, -1)
    message = torch.tensor([int(failed), *order], dtype=torch.int64, device=device)
    torch.distributed.broadcast(message, src=0)
    failed, stage_index, step = message.tolist()
    if failed or stage_index < 0:
        return bool(failed), None
    return False, Checkpoint(checkpoint_path(directory, stage_index, step), stage_index, step)
