"""The training loop: specialist pretraining and anchor binding, one loop a reader can follow.

``run_recipe`` builds the model from a recipe, runs its stages in order, saves the model and
evaluates it. A stage is either

* ``pretrain``: one modality learns on its own with labels (SupCon, or the MNIST lesson's pairwise
  cosine loss), to give the anchor (or any tower) a good space before binding; or
* ``bind``: the anchor is frozen and each paired modality is pulled onto it with InfoNCE; every
  step takes one batch per paired modality and sums their losses with the recipe's weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cache import FeatureCache, Indexed
from .data import Items, build_dataset
from .data.augment import build_augment
from .data.pairs import AnchorPairs, EpochSampler, Preprocessed
from .encoder import move_to
from .errors import ConfigError
from .evaluate import evaluate_model
from .losses import info_nce, label_aware_info_nce, pairwise_cosine_loss, supcon_loss
from .model import BindModel, atomic_write
from .recipe import OptimSpec, Recipe, StageSpec, recipe_to_dict
from .registry import create_encoder

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
        encoders[modality] = encoder
    model = BindModel(encoders, recipe.anchor_modality)
    for modality, spec in recipe.modalities.items():
        if spec.share_frame_encoder_with:
            model.share_trunk(modality, spec.share_frame_encoder_with, "share")
    return model


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and logit scales (parameters with ndim <= 1), as CLIP does."""
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def warmup_cosine(optim: OptimSpec, total_steps: int):
    """lr multiplier: linear warmup, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def endless(loader: DataLoader) -> Iterator[Any]:
    """Batches forever; the loader's EpochSampler makes each pass a new epoch of shuffling and augmentation."""
    while True:
        yield from loader


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


# ---- one stage -------------------------------------------------------------------------------------
class StageRunner:
    """Runs one stage on a model; holds the data loaders and the optimizer of that stage only."""

    def __init__(
        self, model: BindModel, recipe: Recipe, stage: StageSpec, device: torch.device, train_sets: dict[str, Items]
    ):
        self.model, self.recipe, self.stage, self.device = model, recipe, stage, device
        anchor = recipe.anchor_modality
        self.modalities = [stage.modality] if stage.kind == "pretrain" else [anchor, *stage.pairs]
        for modality in self.modalities:  # the stage's freeze overrides the modality's; the anchor binds frozen
            default = "all" if stage.kind == "bind" and modality == anchor else None
            part = stage.freeze.get(modality, default)
            if part is not None:
                model[modality].freeze(part)
        # frozen trunks whose inputs are not augmented: compute their features once (bind/cache.py)
        self.caches: dict[str, FeatureCache] = {}
        for modality in self.modalities:
            if model[modality].trunk_frozen and not self._augment(modality):
                log.info("caching %s trunk features for stage %s", modality, stage.name)
                self.caches[modality] = FeatureCache(
                    model[modality], train_sets[modality], device, num_workers=recipe.num_workers
                )
        self.loaders: dict[str, DataLoader] = {}
        if stage.kind == "pretrain":
            self.loaders[stage.modality] = self._loader(
                self._dataset(stage.modality, train_sets), stage.batch_size, self._collate_single(stage.modality)
            )
        else:
            anchor_set = self._dataset(anchor, train_sets)
            for modality, pair in stage.pairs.items():
                pairs = AnchorPairs(anchor_set, self._dataset(modality, train_sets), pair.pairing, recipe.seed)
                self.loaders[modality] = self._loader(pairs, pair.batch_size, self._collate_pair(modality))
        self.steps_per_epoch = max(len(loader) for loader in self.loaders.values())
        self.total_steps = stage.steps or max(1, math.ceil(stage.epochs * self.steps_per_epoch))
        params = list({id(p): p for m in self.modalities for p in model[m].parameters() if p.requires_grad}.values())
        if not params:
            raise ConfigError(f"stage {stage.name!r}: nothing to train (every encoder of the stage is frozen)")
        self.params = params
        self.optimizer = torch.optim.AdamW(
            param_groups(params, stage.optimizer.weight_decay), lr=stage.optimizer.lr, betas=stage.optimizer.betas
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(stage.optimizer, self.total_steps)
        )

    def _augment(self, modality: str) -> Any:
        """The modality's augmenter in this stage; the anchor of a bind stage is never augmented."""
        if self.stage.kind == "bind" and modality == self.recipe.anchor_modality:
            return None
        return build_augment(modality, self.recipe.modalities[modality].train_data.augment)

    def _dataset(self, modality: str, train_sets: dict[str, Items]) -> Any:
        if modality in self.caches:
            return Indexed(train_sets[modality])
        return Preprocessed(
            train_sets[modality], self.model[modality].preprocess, self._augment(modality), self.recipe.seed
        )

    def _collate_fn(self, modality: str):
        return torch.tensor if modality in self.caches else self.model[modality].collate

    def _collate_single(self, modality: str):
        collate = self._collate_fn(modality)
        return lambda batch: (collate([b[0] for b in batch]), torch.tensor([b[1] for b in batch]))

    def _collate_pair(self, modality: str):
        anchor_collate, collate = self._collate_fn(self.recipe.anchor_modality), self._collate_fn(modality)
        return lambda batch: (
            anchor_collate([b[0] for b in batch]),
            collate([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]),
        )

    def _loader(self, dataset: Any, batch_size: int, collate) -> DataLoader:
        workers = self.recipe.num_workers
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)),
            sampler=EpochSampler(len(dataset), self.recipe.seed),
            drop_last=True,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,  # workers live across epochs: the sampler's keys carry the epoch
            pin_memory=self.device.type == "cuda",
        )

    def _embed(self, modality: str, batch: Any) -> torch.Tensor:
        encoder = self.model[modality]
        with torch.no_grad() if encoder.frozen else nullcontext():  # a frozen tower needs no graph
            if modality in self.caches:  # batch holds item indices
                return encoder.embed_features(*self.caches[modality].gather(batch))
            return encoder(move_to(batch, self.device, non_blocking=self.device.type == "cuda"))

    def loss(self, iterators: dict[str, Iterator[Any]]) -> tuple[torch.Tensor, dict[str, float], int]:
        """One micro-batch: the stage's loss, its parts for logging, and the number of samples."""
        stage = self.stage
        if stage.kind == "pretrain":
            x, labels = next(iterators[stage.modality])
            z, labels = self._embed(stage.modality, x), labels.to(self.device)
            if stage.loss == "supcon":
                loss = supcon_loss(z, labels, stage.temperature)
            else:  # pairwise: each item against the next one in the (shuffled) batch
                loss = pairwise_cosine_loss(z, z.roll(1, 0), labels == labels.roll(1, 0))
            return loss, {stage.modality: loss.item()}, len(labels)
        total, parts, samples = 0.0, {}, 0
        for modality, pair in stage.pairs.items():
            anchor_x, x, labels = next(iterators[modality])
            za, zm = self._embed(self.recipe.anchor_modality, anchor_x), self._embed(modality, x)
            scale = self.model[modality].logit_scale
            if pair.loss == "label_aware_info_nce":
                labels = labels.to(self.device)
                loss = label_aware_info_nce(zm, za, labels, labels, scale)
            else:
                loss = info_nce(zm, za, scale)
            total = total + pair.weight * loss
            parts[modality] = loss.item()
            samples += len(labels)
        return total, parts, samples

    def run(self, metrics: MetricsLog, checkpoint_dir: Path, show_progress: bool = True) -> None:
        stage, optim = self.stage, self.stage.optimizer
        self.model.train()
        iterators = {m: endless(loader) for m, loader in self.loaders.items()}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        bar = tqdm(range(self.total_steps), desc=stage.name, disable=not show_progress, dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        for step in bar:
            for _ in range(optim.grad_accum_steps):
                with autocast:
                    loss, parts, samples = self.loss(iterators)
                (loss / optim.grad_accum_steps).backward()
                window_samples += samples
            grad_norm = None
            if optim.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scales(self.model)
            done = step + 1
            if done % stage.log_every == 0 or done == self.total_steps:
                rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_samples = time.perf_counter(), 0
                record = {
                    "stage": stage.name,
                    "step": done,
                    "loss": loss.item(),
                    "losses": parts,
                    "lr": self.scheduler.get_last_lr()[0],
                    "samples_per_s": round(rate, 1),
                    "grad_norm": grad_norm,
                }
                metrics.write(record)
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
            if done % self.steps_per_epoch == 0 or done == self.total_steps:
                save_checkpoint(
                    self.model,
                    checkpoint_dir,
                    {"stage": stage.name, "step": done, "epoch": done / self.steps_per_epoch},
                )
        bar.close()


def clamp_logit_scales(model: BindModel) -> None:
    """Keep learnable logit scales in [1, max] after each step, as CLIP clamps at 100."""
    with torch.no_grad():
        for encoder in model.encoders.values():
            if encoder.log_logit_scale.requires_grad:
                encoder.log_logit_scale.clamp_(0.0, math.log(encoder.max_logit_scale))


def save_checkpoint(model: BindModel, directory: Path, state: dict[str, Any]) -> None:
    model.save_pretrained(directory)
    atomic_write(directory / "trainer_state.json", json.dumps(state).encode())


# ---- the whole recipe -------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, out_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Train every stage of ``recipe``, save the model into ``out_dir`` and evaluate it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    seed_everything(recipe.seed)
    device = resolve_device(recipe.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(recipe).to(device)
    metrics = MetricsLog(out_dir / "metrics.jsonl", recipe.tensorboard)
    train_sets = {
        m: build_dataset(s.train_data, recipe.data_root)
        for m, s in recipe.modalities.items()
        if s.train_data is not None
    }
    for stage in recipe.stages:
        log.info("stage %s (%s)", stage.name, stage.kind)
        runner = StageRunner(model, recipe, stage, device, train_sets)
        runner.run(metrics, out_dir / "checkpoint", show_progress)
    model.save_pretrained(out_dir)
    model.eval()
    results = evaluate_model(model, recipe, device)
    metrics.write({"stage": "eval", **results})
    atomic_write(out_dir / "eval.json", json.dumps(results, indent=2).encode())
    return results
