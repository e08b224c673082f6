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
from collections.abc import Callable, Iterator
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
from .distributed import (
    SINGLE_PROCESS,
    Dist,
    all_reduce_gradients,
    barrier,
    broadcast_parameters,
    gather_with_grad,
    init_distributed,
    mean_over_ranks,
)
from .encoder import move_to
from .errors import ConfigError
from .evaluate import embed_eval_splits, evaluate_model
from .gradcache import ChunkedEmbedding, batch_size_of
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
        self,
        model: BindModel,
        recipe: Recipe,
        stage: StageSpec,
        device: torch.device,
        train_sets: dict[str, Items],
        dist: Dist = SINGLE_PROCESS,
    ):
        self.model, self.recipe, self.stage, self.device, self.dist = model, recipe, stage, device, dist
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
            if recipe.feature_cache and model[modality].trunk_frozen and not self._augment(modality):
                self.caches[modality] = FeatureCache.build(
                    model[modality], train_sets[modality], device, recipe.cache_dir, recipe.num_workers, dist
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
        bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.towers = {m: self._tower(m) for m in self.modalities}

    def _tower(self, modality: str) -> Callable[[Any], torch.Tensor]:
        """What embeds one batch of ``modality`` (item indices when its features are cached)."""
        encoder = self.model[modality]
        if modality in self.caches:
            cache = self.caches[modality]
            return lambda indices: encoder.embed_features(*cache.gather(indices))
        if self.recipe.compile and not encoder.frozen:
            return torch.compile(encoder)
        return encoder

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
        workers, world = self.recipe.num_workers, self.dist.world_size
        if batch_size % world:
            raise ConfigError(f"stage {self.stage.name!r}: batch size {batch_size} is not divisible by {world} ranks")
        local_batch = min(batch_size, len(dataset)) // world  # each rank's slice of the global batch
        return DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=EpochSampler(len(dataset), self.recipe.seed, local_batch, self.dist.rank, world),
            drop_last=True,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,  # workers live across epochs: the sampler's keys carry the epoch
            pin_memory=self.device.type == "cuda",
        )

    def _embed(self, modality: str, batch: Any, replays: list[ChunkedEmbedding]) -> torch.Tensor:
        """This rank's embeddings of ``batch``, gathered over ranks (with their gradient path)."""
        tower, encoder = self.towers[modality], self.model[modality]
        if modality not in self.caches:
            batch = move_to(batch, self.device, non_blocking=self.device.type == "cuda")
            if self.recipe.channels_last and isinstance(batch, torch.Tensor) and batch.ndim == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
        chunk = self.stage.chunk_size
        if encoder.frozen:  # a frozen tower needs no graph
            with torch.no_grad():
                z = tower(batch)
        elif chunk and batch_size_of(batch) > chunk:  # GradCache (bind/gradcache.py)
            replay = ChunkedEmbedding(tower, batch, chunk, self.device, self.autocast)
            replays.append(replay)
            z = replay.embeddings
        else:
            z = tower(batch)
        return gather_with_grad(z)

    def loss(self, iterators: dict[str, Iterator[Any]]) -> tuple[torch.Tensor, dict[str, float], int, list]:
        """One micro-batch: the stage's loss, its parts for logging, the number of samples, and the
        GradCache replays to backpropagate after the loss (empty without ``chunk_size``).

        With several ranks, embeddings and labels are the global batch; ``local_loss`` scores this
        rank's rows only (against all columns)."""
        stage, replays = self.stage, []
        if stage.kind == "pretrain":
            x, labels = next(iterators[stage.modality])
            z, labels = self._embed(stage.modality, x, replays), gather_with_grad(labels.to(self.device))
            if stage.loss == "supcon":
                loss = supcon_loss(z, labels, stage.temperature)
            else:  # pairwise: each item against the next one in the (shuffled) batch
                loss = pairwise_cosine_loss(z, z.roll(1, 0), labels == labels.roll(1, 0))
            return loss, {stage.modality: loss.item()}, len(labels), replays
        total, parts, samples = 0.0, {}, 0
        for modality, pair in stage.pairs.items():
            anchor_x, x, labels = next(iterators[modality])
            za = self._embed(self.recipe.anchor_modality, anchor_x, replays)
            zm = self._embed(modality, x, replays)
            labels = gather_with_grad(labels.to(self.device))
            rows = None
            if stage.local_loss and self.dist.enabled:
                n = len(labels) // self.dist.world_size
                rows = slice(self.dist.rank * n, (self.dist.rank + 1) * n)
            scale = self.model[modality].logit_scale
            if pair.loss == "label_aware_info_nce":
                loss = label_aware_info_nce(zm, za, labels, labels, scale, rows=rows)
            else:
                loss = info_nce(zm, za, scale, rows=rows)
            total = total + pair.weight * loss
            parts[modality] = loss.item() if rows is None else mean_over_ranks(loss.item(), self.device)
            samples += len(labels)
        return total, parts, samples, replays

    def backward(self, iterators: dict[str, Iterator[Any]]) -> tuple[float, dict[str, float], int]:
        """Forward and backward of one optimizer step (all its micro-batches); gradients averaged over ranks.

        Returns the loss (of the last micro-batch, over the global batch), its parts and the samples seen."""
        accum, samples = self.stage.optimizer.grad_accum_steps, 0
        for _ in range(accum):
            with self.autocast():
                loss, parts, n, replays = self.loss(iterators)
            (loss / accum).backward()
            for replay in replays:  # GradCache: the loss's gradient, now through the towers
                replay.backward()
            samples += n
        all_reduce_gradients(self.params)
        if self.stage.kind == "bind":  # each part is already the global batch's loss
            return sum(pair.weight * parts[m] for m, pair in self.stage.pairs.items()), parts, samples
        return loss.item(), parts, samples

    def run(self, metrics: MetricsLog | None, checkpoint_dir: Path, show_progress: bool = True) -> None:
        """Train the stage's steps; ``metrics`` and checkpoints only on the main rank."""
        stage, optim = self.stage, self.stage.optimizer
        self.model.train()
        iterators = {m: endless(loader) for m, loader in self.loaders.items()}
        show = show_progress and self.dist.is_main
        bar = tqdm(range(self.total_steps), desc=stage.name, disable=not show, dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        for step in bar:
            loss, parts, samples = self.backward(iterators)
            window_samples += samples
            grad_norm = None
            if optim.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scales(self.model)
            done = step + 1
            if metrics is not None and (done % stage.log_every == 0 or done == self.total_steps):
                rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_samples = time.perf_counter(), 0
                record = {
                    "stage": stage.name,
                    "step": done,
                    "loss": loss,
                    "losses": parts,
                    "lr": self.scheduler.get_last_lr()[0],
                    "samples_per_s": round(rate, 1),
                    "grad_norm": grad_norm,
                }
                metrics.write(record)
                bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}")
            if self.dist.is_main and (done % self.steps_per_epoch == 0 or done == self.total_steps):
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
    """Train every stage of ``recipe``, save the model into ``out_dir`` and evaluate it.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this; rank 0 writes the run directory.
    """
    out_dir = Path(out_dir)
    device = resolve_device(recipe.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
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
    metrics = MetricsLog(out_dir / "metrics.jsonl", recipe.tensorboard) if dist.is_main else None
    train_sets = {
        m: build_dataset(s.train_data, recipe.data_root)
        for m, s in recipe.modalities.items()
        if s.train_data is not None
    }
    for stage in recipe.stages:
        log.info("stage %s (%s)", stage.name, stage.kind)
        runner = StageRunner(model, recipe, stage, device, train_sets, dist)
        runner.run(metrics, out_dir / "checkpoint", show_progress)
    model.eval()
    results = evaluate_model(model, recipe, device, embed_eval_splits(model, recipe, device, dist))
    if dist.is_main:
        model.save_pretrained(out_dir)
        metrics.write({"stage": "eval", **results})
        atomic_write(out_dir / "eval.json", json.dumps(results, indent=2).encode())
    barrier()
    return results
