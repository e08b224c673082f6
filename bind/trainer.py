"""The training loop: specialist pretraining and anchor binding, one loop a reader can follow.

``run_recipe`` builds the model from a recipe, runs its stages in order, saves the model and
evaluates it. A stage is either

* ``pretrain``: one modality learns on its own with labels (SupCon, or the MNIST lesson's pairwise
  cosine loss), to give the anchor (or any tower) a good space before binding; or
* ``bind``: the anchor is frozen and each paired modality is pulled onto it with InfoNCE; every
  step takes one batch per paired modality and sums their losses with the recipe's weights.

A stage's loop is :class:`bind.stage.StageRunner`; this module builds the model, resumes from a
checkpoint, starts trunks from another modality's (``init_from``) and evaluates at the end.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .checkpoint import (
    Checkpoint,
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
)
from .data import build_dataset
from .distributed import (
    barrier,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from .errors import ConfigError
from .evaluate import embed_eval_splits, evaluate_model
from .init import init_from_encoder
from .model import BindModel, atomic_write
from .recipe import Recipe, StageSpec, recipe_to_dict
from .registry import create_encoder
from .stage import CheckpointWriter, MetricsLog, StageRunner, StopFlag

log = logging.getLogger(__name__)


# ---- building blocks -------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe) -> BindModel:
    encoders = {}
    for modality, spec in recipe.modalities.items():
        encoder = create_encoder(spec.encoder, embed_dim=recipe.embed_dim, **spec.args)
        encoder.freeze(spec.freeze, spec.unfreeze_last_blocks)
        if spec.lora is not None:  # after freeze: the adapters, the head and any unfrozen blocks train
            from .lora import apply_lora  # imported here: this change is confined to build_model

            lora = spec.lora
            try:
                apply_lora(encoder, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
            except ConfigError as err:
                raise ConfigError(f"{recipe.source}: modalities.{modality}.{err}") from None
        encoders[modality] = encoder
    model = BindModel(encoders, recipe.anchor_modality)
    for modality, spec in recipe.modalities.items():
        if spec.share_frame_encoder_with:
            model.share_trunk(modality, spec.share_frame_encoder_with, "share")
    return model


# ---- the whole recipe -------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, out_dir: str | Path, show_progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train every stage of ``recipe``, save the model into ``out_dir`` and evaluate it.

    ``resume`` continues from the newest checkpoint in ``out_dir/checkpoints`` with the same weights,
    optimizer, scheduler, random states and data position, so the run ends as if never stopped.
    Under torchrun (``WORLD_SIZE`` > 1) every process runs this; rank 0 writes the run directory.
    """
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    device = resolve_device(recipe.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    resume_from = _checkpoint_to_resume(recipe, checkpoint_dir) if resume else None
    if not resume and list_checkpoints(checkpoint_dir):
        if not (out_dir / "model.safetensors").is_file():
            raise ConfigError(
                f"{checkpoint_dir} holds the checkpoints of an unfinished run: continue it with --resume, "
                "or give another --out (or delete that folder) to start over"
            )
        if dist.is_main:  # a finished run is being replaced: its checkpoints would mix with the new ones
            shutil.rmtree(checkpoint_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    seed_everything(recipe.seed)
    if device.type == "cuda":  # TF32 matmuls: ~fp32 accuracy at tensor-core speed for what runs outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(recipe).to(device)
    if recipe.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    broadcast_parameters(model)
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
                runner.restore_counters(load_training_state(resume_from, runner.optimizer, runner.scheduler))
                start = resume_from.step
                runner.seek(start)
                if metrics is not None:
                    metrics.write({"stage": stage.name, "event": "resumed", "from_step": start})
                log.info("resuming stage %s at step %d from %s", stage.name, start, resume_from.path)
            writer = CheckpointWriter(checkpoint_dir, recipe, index) if dist.is_main else None
            runner.run(metrics, writer, show_progress, start_step=start, stop=stop)
    model.eval()
    model.class_names = _class_names(recipe, train_sets)
    if dist.is_main:  # saved before evaluating: a failing evaluation loses no training
        model.save_pretrained(out_dir)
    results = evaluate_model(model, recipe, device, embed_eval_splits(model, recipe, device, dist, show_progress))
    if dist.is_main:
        metrics.write({"stage": "eval", **results})
        atomic_write(out_dir / "eval.json", json.dumps(results, indent=2).encode())
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


def _checkpoint_to_resume(recipe: Recipe, directory: Path) -> Checkpoint:
    """The newest complete checkpoint, checked against the recipe it must continue."""
    clean_partial(directory)
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {directory}; run without --resume to start from scratch")
    saved = checkpoint.state.get("recipe", {})
    current = json.loads(json.dumps(recipe_to_dict(recipe)))
    harmless = {
        "source",
        "data_root",
        "num_workers",
        "cache_dir",
        "tensorboard",
        "checkpoint_every",
        "keep_checkpoints",
    }
    changed = sorted(k for k in (set(saved) | set(current)) - harmless if saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(
            f"--resume: the recipe differs from the one {checkpoint.path} was trained with (keys: {', '.join(changed)});"
            " resume with the same recipe and overrides, or start a new run directory"
        )
    return checkpoint
