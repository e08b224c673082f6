"""One training stage: its loaders, optimizer and loop; checkpoints and signals while it runs.

:class:`StageRunner` is what ``run_recipe`` (bind/trainer.py) runs for each stage of a recipe:
it freezes what the stage freezes, caches frozen trunks' features, builds one loader per
modality (indexed datasets or streamed shards, this rank's slice of each global batch), and runs
the optimizer steps: forward, loss (GradCache chunks, global negatives across ranks), backward,
gradient all-reduce, clipping, a skipped update on a non-finite loss, logging and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cache import FeatureCache, Indexed
from .checkpoint import (
    save_checkpoint,
)
from .data import Items, resolve_data_root
from .data.augment import build_augment
from .data.pairs import AnchorPairs, EpochSampler, Preprocessed
from .data.shards import ShardPairs, ShardPreprocessed, ShardStream, collate_with_bad
from .distributed import (
    SINGLE_PROCESS,
    Dist,
    all_reduce_gradients,
    barrier,
    gather_with_grad,
    mean_over_ranks,
)
from .encoder import move_to
from .errors import ConfigError, DataError, Interrupted, TrainingError
from .gradcache import ChunkedEmbedding, batch_size_of
from .losses import info_nce, label_aware_info_nce, pairwise_cosine_loss, supcon_loss
from .model import BindModel
from .recipe import OptimSpec, Recipe, StageSpec, recipe_to_dict

log = logging.getLogger(__name__)


# ---- optimisation --------------------------------------------------------------------------------
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
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # e.g. streamed shards whose workers each hold less than one batch: never loop on nothing
            raise DataError(
                f"a pass over the {type(loader.dataset).__name__} data gave no full batch of {loader.batch_size}; "
                "use a smaller batch_size, fewer num_workers, or more (or larger) shards"
            )


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
        show_progress: bool = False,
    ):
        self.model, self.recipe, self.stage, self.device, self.dist = model, recipe, stage, device, dist
        anchor = recipe.anchor_modality
        self.modalities = [stage.modality] if stage.kind == "pretrain" else [anchor, *stage.pairs]
        for modality in self.modalities:  # the stage's freeze overrides the modality's; the anchor binds frozen
            spec, encoder = recipe.modalities[modality], model[modality]
            default = "all" if stage.kind == "bind" and modality == anchor else None
            part = stage.freeze.get(modality, default)
            if part is not None:
                encoder.freeze(part)
            else:  # an earlier stage may have overridden it: back to the modality's own, as a resumed run has it
                own = "trunk" if spec.lora is not None and spec.freeze == "none" else spec.freeze  # bind/lora.py
                if (encoder.frozen_part, encoder.unfreeze_last_blocks) != (own, spec.unfreeze_last_blocks):
                    encoder.freeze(own, spec.unfreeze_last_blocks)
        # frozen trunks whose inputs are not augmented: compute their features once (bind/cache.py)
        self.caches: dict[str, FeatureCache] = {}
        streamed = any(recipe.modalities[m].train_data.stream for m in self.modalities)  # no item indices to cache by
        for modality in self.modalities:
            if recipe.feature_cache and not streamed and model[modality].trunk_frozen and not self._augment(modality):
                self.caches[modality] = FeatureCache.build(
                    model[modality],
                    train_sets[modality],
                    device,
                    recipe.cache_dir,
                    recipe.num_workers,
                    dist,
                    show_progress=show_progress and dist.is_main,
                )
        # bad items (name -> error) met in this stage; their share of the stage's items is capped
        self.bad_items: dict[str, str] = {}
        self.stage_items = sum(len(train_sets[m]) for m in self.modalities)
        for modality, cache in self.caches.items():
            self.note_bad_items(modality, cache.bad)
        self.nonfinite_steps = 0
        self.loaders: dict[str, DataLoader] = {}
        self.epoch_steps: dict[str, int] = {}  # batches per epoch of each loader
        if stage.kind == "pretrain":
            collate = self._collate_single(stage.modality)
            if recipe.modalities[stage.modality].train_data.stream:
                stream = self._stream(stage.modality)
                self.loaders[stage.modality] = self._stream_loader(stage.modality, stream, stage.batch_size, collate)
            else:
                dataset = self._dataset(stage.modality, train_sets)
                self.loaders[stage.modality] = self._loader(stage.modality, dataset, stage.batch_size, collate)
        else:
            anchor_set = self._dataset(anchor, train_sets)
            for modality, pair in stage.pairs.items():
                if recipe.modalities[modality].train_data.stream:
                    stream = self._stream(modality, recipe.modalities[anchor].train_data.args["column"])
                    loader = self._stream_loader(modality, stream, pair.batch_size, self._collate_pair(modality))
                else:
                    pairs = AnchorPairs(anchor_set, self._dataset(modality, train_sets), pair.pairing, recipe.seed)
                    loader = self._loader(modality, pairs, pair.batch_size, self._collate_pair(modality))
                self.loaders[modality] = loader
        # optimizer steps per pass over the largest training set (each step takes grad_accum_steps batches)
        self.steps_per_epoch = max(1, max(self.epoch_steps.values()) // stage.optimizer.grad_accum_steps)
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

    def note_bad_items(self, modality: str, bad: list[tuple[str, str]]) -> None:
        """Count items that could not be read; fail at once with ``on_bad_item: fail`` or past the share."""
        for name, message in bad:
            if self.recipe.on_bad_item == "fail":
                raise DataError(f"{name}: {message} ({modality} item; on_bad_item: fail stops at the first bad item)")
            if name not in self.bad_items:
                log.warning("skipping bad %s item %s: %s", modality, name, message)
            self.bad_items[name] = message
        if len(self.bad_items) > self.recipe.max_bad_fraction * self.stage_items:
            listed = "\n".join(f"  {name}: {message}" for name, message in list(self.bad_items.items())[:20])
            raise DataError(
                f"stage {self.stage.name!r}: {len(self.bad_items)} of {self.stage_items} items are bad, more than "
                f"max_bad_fraction={self.recipe.max_bad_fraction}; fix or remove them:\n{listed}"
            )

    def seek(self, steps_done: int) -> None:
        """Position every loader as it stands after ``steps_done`` optimizer steps (resuming mid-stage)."""
        consumed = steps_done * self.stage.optimizer.grad_accum_steps
        for modality, loader in self.loaders.items():
            epoch, batches = divmod(consumed, self.epoch_steps[modality])
            if isinstance(loader.dataset, ShardStream):  # a stream cannot seek: its epoch restarts
                log.warning(
                    "%s: streamed shards resume at the start of epoch %d, not at batch %d", modality, epoch, batches
                )
                loader.dataset.set_epoch(epoch)
            else:
                loader.sampler.resume_at(epoch, batches)

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
        encoder = self.model[modality]
        augment, seed = self._augment(modality), self.recipe.seed
        return Preprocessed(train_sets[modality], encoder.preprocess, augment, seed, skip_bad=True)

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

    def _local_batch(self, batch_size: int, size: int) -> int:
        world = self.dist.world_size
        if batch_size % world:
            raise ConfigError(f"stage {self.stage.name!r}: batch size {batch_size} is not divisible by {world} ranks")
        return min(batch_size, size) // world  # each rank's slice of the global batch

    def _stream(self, modality: str, anchor_column: str | None = None) -> ShardStream:
        """This rank's share of ``modality``'s training shards; with ``anchor_column``, paired with the anchor's."""
        spec = self.recipe.modalities[modality].train_data
        path = Path(spec.args["path"])
        path = path if path.is_absolute() else resolve_data_root(self.recipe.data_root) / path
        options = {
            "augment": self._augment(modality),
            "shuffle_buffer": spec.shuffle_buffer,
            "seed": self.recipe.seed,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
        }
        preprocess = self.model[modality].preprocess
        if anchor_column is None:
            return ShardPreprocessed(path, spec.args["column"], preprocess, **options)
        anchor_preprocess = self.model[self.recipe.anchor_modality].preprocess
        return ShardPairs(path, anchor_column, spec.args["column"], anchor_preprocess, preprocess, **options)

    def _stream_loader(self, modality: str, stream: Any, batch_size: int, collate) -> DataLoader:
        """Batches from a shard stream; an epoch is the shards' sample count over the global batch, on every rank."""
        local_batch = self._local_batch(batch_size, stream.index.samples)
        self.epoch_steps[modality] = max(1, stream.index.samples // (local_batch * self.dist.world_size))
        workers = self.recipe.num_workers
        return DataLoader(
            stream,
            batch_size=local_batch,
            drop_last=True,
            collate_fn=collate_with_bad(collate),
            generator=torch.Generator().manual_seed(self.recipe.seed),  # not the global RNG
            num_workers=workers,
            persistent_workers=workers > 0,  # each pass of a persistent worker is the stream's next epoch
            pin_memory=self.device.type == "cuda",
        )

    def _loader(self, modality: str, dataset: Any, batch_size: int, collate) -> DataLoader:
        """Batches of ``collate(items)``, plus the bad items met on the way (drained in the worker that met them)."""
        workers, world = self.recipe.num_workers, self.dist.world_size
        local_batch = self._local_batch(batch_size, len(dataset))
        self.epoch_steps[modality] = len(dataset) // (local_batch * world)
        return DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=EpochSampler(len(dataset), self.recipe.seed, local_batch, self.dist.rank, world),
            drop_last=True,
            collate_fn=lambda batch: (*collate(batch), dataset.drain_bad()),
            # its own generator: a new pass must not draw from the global RNG, or a resumed run would differ
            generator=torch.Generator().manual_seed(self.recipe.seed),
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
            x, labels, bad = next(iterators[stage.modality])
            self.note_bad_items(stage.modality, bad)
            z, labels = self._embed(stage.modality, x, replays), gather_with_grad(labels.to(self.device))
            if stage.loss == "supcon":
                loss = supcon_loss(z, labels, stage.temperature)
            else:  # pairwise: each item against the next one in the (shuffled) batch
                loss = pairwise_cosine_loss(z, z.roll(1, 0), labels == labels.roll(1, 0))
            return loss, {stage.modality: loss.item()}, len(labels), replays
        total, parts, samples = 0.0, {}, 0
        for modality, pair in stage.pairs.items():
            anchor_x, x, labels, bad = next(iterators[modality])
            self.note_bad_items(modality, bad)
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

        Returns the loss (the mean over micro-batches, of the global batch: NaN if any was), its parts
        (last micro-batch) and the samples seen."""
        accum, samples, total = self.stage.optimizer.grad_accum_steps, 0, 0.0
        for _ in range(accum):
            with self.autocast():
                loss, parts, n, replays = self.loss(iterators)
            (loss / accum).backward()
            for replay in replays:  # GradCache: the loss's gradient, now through the towers
                replay.backward()
            samples += n
            if self.stage.kind == "bind":  # each part is already the global batch's loss
                total += sum(pair.weight * parts[m] for m, pair in self.stage.pairs.items()) / accum
            else:
                total += loss.item() / accum
        all_reduce_gradients(self.params)
        return total, parts, samples

    def run(
        self,
        metrics: MetricsLog | None,
        checkpoints: CheckpointWriter | None = None,
        show_progress: bool = True,
        start_step: int = 0,
        stop: StopFlag | None = None,
    ) -> None:
        """Train steps ``start_step + 1 .. total_steps``; metrics and checkpoints on the main rank only."""
        stage, optim = self.stage, self.stage.optimizer
        self.model.train()
        iterators = {m: endless(loader) for m, loader in self.loaders.items()}
        show = show_progress and self.dist.is_main
        bar = tqdm(
            range(start_step, self.total_steps),
            desc=stage.name,
            disable=not show,
            dynamic_ncols=True,
            initial=start_step,
            total=self.total_steps,
        )
        window_start, window_samples, nonfinite_in_a_row = time.perf_counter(), 0, 0
        postfix: dict[str, Any] = {}
        for step in bar:
            done = step + 1
            loss, parts, samples = self.backward(iterators)
            window_samples += samples
            if show:  # the loss from the first step on; the throughput at each log step
                postfix["loss"] = f"{loss:.3f}"
                bar.set_postfix(postfix, refresh=False)
            # the norm also when not clipping (max inf: no change): a NaN gradient must be caught either way
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip or math.inf))
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self.optimizer.step()
                self.scheduler.step()
                clamp_logit_scales(self.model)
                nonfinite_in_a_row = 0
            else:  # skip the update: one bad batch must not poison the weights
                self.nonfinite_steps += 1
                nonfinite_in_a_row += 1
                log.warning("stage %s step %d: non-finite loss or gradient, step skipped", stage.name, done)
                if nonfinite_in_a_row >= self.recipe.max_nonfinite_steps:
                    last = checkpoints.last if checkpoints else None
                    raise TrainingError(
                        f"stage {stage.name!r}: the loss or gradient was NaN/inf for {nonfinite_in_a_row} steps in a "
                        f"row (last at step {done}); last checkpoint: {last or 'none'}. Lower the learning rate, "
                        "check the inputs, or raise max_nonfinite_steps"
                    )
            self.optimizer.zero_grad(set_to_none=True)
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
                    "bad_items": len(self.bad_items),
                    "nonfinite_steps": self.nonfinite_steps,
                }
                metrics.write(record)
                postfix.update({"loss": f"{loss:.3f}", "samples_s": f"{rate:.0f}"})
                if self.bad_items:
                    postfix["bad"] = len(self.bad_items)
                if self.nonfinite_steps:
                    postfix["nan_skipped"] = self.nonfinite_steps
                bar.set_postfix(postfix)
            stopping = stop is not None and stop.requested(self.dist, self.device)
            every = self.recipe.checkpoint_every
            due = (every and done % every == 0) or done % self.steps_per_epoch == 0 or done == self.total_steps
            if checkpoints is not None and (due or stopping):
                checkpoints.save(self, done)
            if stopping:
                barrier()  # no rank exits (and has torchrun stop the others) before rank 0's checkpoint is written
                bar.close()
                raise Interrupted(stop.signal_name, stage.name, done, checkpoints.last if checkpoints else None)
        bar.close()

    def counters(self) -> dict[str, Any]:
        return {"bad_items": self.bad_items, "nonfinite_steps": self.nonfinite_steps}

    def restore_counters(self, state: dict[str, Any]) -> None:
        self.bad_items.update(state.get("bad_items", {}))
        self.nonfinite_steps = state.get("nonfinite_steps", 0)


class CheckpointWriter:
    """Writes the checkpoints of one run (main rank only), remembering the newest."""

    def __init__(self, directory: Path, recipe: Recipe, stage_index: int) -> None:
        self.directory, self.recipe, self.stage_index = directory, recipe, stage_index
        self.last: Path | None = None

    def save(self, runner: StageRunner, step: int) -> None:
        extra = {"stage": runner.stage.name, "total_steps": runner.total_steps, "recipe": recipe_to_dict(self.recipe)}
        self.last = save_checkpoint(
            self.directory,
            runner.model,
            runner.optimizer,
            runner.scheduler,
            self.stage_index,
            step,
            {**extra, **runner.counters()},
            keep=self.recipe.keep_checkpoints,
        )


class StopFlag:
    """SIGTERM and SIGINT set a flag instead of killing the process: the loop checkpoints, then stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        # torchrun and terminals repeat a signal (Ctrl-C reaches every process, then torchrun forwards it):
        # the second one must not break the checkpoint being written; a third stops at once
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def requested(self, dist: Dist, device: torch.device) -> bool:
        """Whether to stop after this step; with several ranks, any rank's signal stops all at the same step."""
        flag = float(self.signal_name is not None)
        if dist.enabled:
            flag = mean_over_ranks(flag, device)
            self.signal_name = self.signal_name or ("SIGTERM" if flag else None)
        return flag > 0


def clamp_logit_scales(model: BindModel) -> None:
    """Keep learnable logit scales in [1, max] after each step, as CLIP clamps at 100."""
    with torch.no_grad():
        for encoder in model.encoders.values():
            if encoder.log_logit_scale.requires_grad:
                encoder.log_logit_scale.clamp_(0.0, math.log(encoder.max_logit_scale))
