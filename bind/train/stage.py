"""One training stage: what it freezes, its loaders and optimizer, and the training step.

:class:`StageRunner` is what ``run_recipe`` (bind/train/trainer.py) runs for each stage of a recipe. Its
:meth:`~StageRunner.train_step` reads top to bottom as one optimizer step:

1. :meth:`~StageRunner.backward`: for each of ``grad_accum_steps`` micro-batches, take the next batch
   of each loader and (:meth:`~StageRunner.micro_batch_loss`) embed each side (cached features,
   GradCache chunks, or a plain forward), gather the embeddings over ranks, score them with the
   stage's registered loss (:mod:`bind.losses`); backpropagate; then average the gradients over ranks;
2. update (:func:`bind.train.optim.apply_update`: clip, skip a NaN/inf step, AdamW, schedule).

:meth:`~StageRunner.run` repeats it, and logs, checkpoints and stops on a signal. The pieces live in
their own modules: loaders in :mod:`bind.train.loaders`, the optimizer in :mod:`bind.train.optim`,
metrics and signals in :mod:`bind.train.monitor`, checkpoints in :mod:`bind.train.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import Items
from ..distributed import (
    SINGLE_PROCESS,
    Dist,
    GradientReducer,
    barrier,
    gather_with_grad,
    mean_over_ranks,
    sync_batchnorm_stats,
)
from ..encoder import move_to
from ..errors import ConfigError, DataError, Interrupted, TrainingError
from ..losses import get_loss
from ..model import BindModel
from ..recipe import Recipe, StageSpec, stage_modalities, tower_freeze
from .batch import BindBatch
from .checkpoint import CheckpointWriter, all_rng_states
from .compile import compile_tower, input_channels_last
from .feature_cache import FeatureCache
from .gradcache import ChunkedEmbedding, batch_size_of
from .loaders import build_stage_loaders, stage_augmenter
from .monitor import MetricsLog, StopFlag
from .optim import apply_update, build_optimizer

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step did: the loss (mean over micro-batches, of the global batch; NaN if any was),
    its parts by modality (last micro-batch), the samples seen, the gradient norm, and whether it updated.

    The loss, its parts and the norm stay on the device: reading one waits for the GPU to finish the step, so
    the loop reads them (:meth:`scalars`, one transfer) on log steps only, as open_clip does."""

    loss: Tensor
    parts: dict[str, Tensor]
    samples: int
    grad_norm: Tensor
    stepped: bool
    data_s: float = 0.0  # seconds blocked on the loaders (open_clip's data_time); the rest of the step is compute

    def scalars(self) -> tuple[float, dict[str, float], float]:
        """``(loss, parts, grad_norm)`` as numbers: one copy from the device for all of them."""
        tensors = [torch.as_tensor(v) for v in (self.loss, self.grad_norm, *self.parts.values())]
        values = torch.stack([t.to(tensors[0].device, torch.float64) for t in tensors]).tolist()
        return values[0], dict(zip(self.parts, values[2:], strict=True)), values[1]


def apply_stage_freeze(model: BindModel, recipe: Recipe, stage: StageSpec) -> None:
    """Freeze each tower of ``stage`` as :func:`bind.recipe.tower_freeze` decides."""
    for modality in stage_modalities(recipe, stage):
        encoder, wanted = model[modality], tower_freeze(recipe, modality, stage)
        if (encoder.frozen_part, encoder.unfreeze_last_blocks) != wanted:
            encoder.freeze(*wanted)


class StageRunner:
    """Runs one stage on a model; holds the loaders and the optimizer of that stage only."""

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
        self.modalities = stage_modalities(recipe, stage)
        apply_stage_freeze(model, recipe, stage)
        self.losses = (
            {stage.modality: get_loss(stage.loss, "pretrain").fn}
            if stage.kind == "pretrain"
            else {m: get_loss(pair.loss, "bind").fn for m, pair in stage.pairs.items()}
        )
        self.bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if self.bf16 else nullcontext
        self.caches = self._feature_caches(train_sets, show_progress and dist.is_main)
        # bad items (name -> error) met in this stage; their share of the stage's items is capped
        self.bad_items: dict[str, str] = {}
        self.stage_items = sum(len(train_sets[m]) for m in self.modalities)
        for modality, cache in self.caches.items():
            self.note_bad_items(modality, cache.bad)
        self.nonfinite_steps = 0
        self.data_wait = 0.0  # seconds blocked on the loaders, since the last train_step read it
        self.data = build_stage_loaders(model, recipe, stage, train_sets, set(self.caches), dist, device)
        self.steps_per_epoch = self.data.steps_per_epoch(stage.optimizer.grad_accum_steps)
        self.total_steps = stage.steps or max(1, math.ceil(stage.epochs * self.steps_per_epoch))
        params = {id(p): p for m in self.modalities for p in model[m].parameters() if p.requires_grad}
        self.params = list(params.values())
        if not self.params:
            raise ConfigError(f"stage {stage.name!r}: nothing to train (every encoder of the stage is frozen)")
        self.optimizer, self.scheduler = build_optimizer(self.params, stage.optimizer, self.total_steps)
        # gradients averaged over ranks in buckets while backward still runs (bind/distributed.py)
        self.reducer = GradientReducer(self.params)
        self.towers = {m: self._tower(m) for m in self.modalities}

    def _feature_caches(self, train_sets: dict[str, Items], show_progress: bool) -> dict[str, FeatureCache]:
        """Frozen trunks whose inputs are not augmented: their features, computed once (bind/train/feature_cache.py)."""
        recipe, stage = self.recipe, self.stage
        if not recipe.feature_cache or any(recipe.modalities[m].train_data.stream for m in self.modalities):
            return {}  # a stream has no item indices to cache by
        return {
            m: FeatureCache.build(
                self.model[m],
                train_sets[m],
                self.device,
                recipe.cache_dir,
                recipe.num_workers,
                self.dist,
                show_progress,
                # what the uncached step computes: the same autocast, features kept in its dtype
                dtype=torch.bfloat16 if self.bf16 else torch.float32,
                autocast=self.autocast,
            )
            for m in self.modalities
            if self.model[m].trunk_frozen and stage_augmenter(recipe, stage, m) is None
        }

    def _tower(self, modality: str) -> Callable[[Any], torch.Tensor]:
        """What embeds one batch of ``modality`` (item indices when its features are cached)."""
        encoder = self.model[modality]
        if modality in self.caches:
            cache = self.caches[modality]
            return lambda indices: encoder.embed_features(*cache.gather(indices))
        if self.recipe.compile and not encoder.frozen:
            backend = "inductor" if self.recipe.compile is True else self.recipe.compile
            return compile_tower(encoder, backend)  # its own dynamo cache, batch size dynamic (bind/train/compile.py)
        return encoder

    # ---- the step -------------------------------------------------------------------------------------
    def train_step(self, iterators: dict[str, Iterator[Any]]) -> StepResult:
        """One optimizer step: the gradients of all its micro-batches (averaged over ranks), then the update."""
        self.data_wait = 0.0
        loss, parts, samples = self.backward(iterators)
        grad_norm, stepped = apply_update(
            self.model, self.params, self.optimizer, self.scheduler, loss, self.stage.optimizer.grad_clip
        )
        return StepResult(loss, parts, samples, grad_norm, stepped, self.data_wait)

    def backward(self, iterators: dict[str, Iterator[Any]]) -> tuple[Tensor, dict[str, Tensor], int]:
        """Forward and backward of one step's ``grad_accum_steps`` micro-batches; gradients averaged over ranks.

        Returns the loss (the mean over micro-batches, of the global batch) and its parts, both on the device
        (nothing here waits for the GPU), and the samples seen."""
        accum, samples, total = self.stage.optimizer.grad_accum_steps, 0, torch.zeros((), device=self.device)
        for micro in range(accum):
            waiting = time.perf_counter()
            batches = {m: next(iterator) for m, iterator in iterators.items()}
            self.data_wait += time.perf_counter() - waiting
            with self.autocast():
                loss, parts, n, replays = self.micro_batch_loss(batches)
            # the last micro-batch's backward passes leave each gradient final: they start its all-reduce
            armed = self.reducer.armed if micro == accum - 1 else nullcontext
            with armed():
                (loss / accum).backward()
            for replay in replays:  # GradCache: the loss's gradient, now through the towers (final at its last chunk)
                replay.backward(last_chunk=armed)
            samples += n
            total += self._reported(loss, parts) / accum
        self.reducer.finish()
        return total, parts, samples

    def micro_batch_loss(self, batches: dict[str, BindBatch]) -> tuple[Tensor, dict[str, Tensor], int, list]:
        """One micro-batch: the stage's loss, its parts for logging (detached, of the global batch), the number
        of samples, and the GradCache replays to backpropagate after the loss (empty without ``chunk_size``).

        With several ranks, embeddings and labels are the global batch; ``local_loss`` scores this
        rank's rows only (against all columns)."""
        stage, replays = self.stage, []
        if stage.kind == "pretrain":
            m = stage.modality
            batch = batches[m]
            self.note_bad_items(m, batch.bad)
            z, labels = self._embed(m, batch.inputs, replays), gather_with_grad(self._labels(batch))
            loss = self.losses[m](z, labels, temperature=stage.temperature)
            return loss, {m: loss.detach()}, len(labels), replays
        total, parts, samples, anchor = 0.0, {}, 0, self.recipe.anchor_modality
        rows = None
        for m, pair in stage.pairs.items():
            batch = batches[m]
            self.note_bad_items(m, batch.bad)
            za, zm = self._embed(anchor, batch.anchor, replays), self._embed(m, batch.inputs, replays)
            labels = gather_with_grad(self._labels(batch))
            if stage.local_loss and self.dist.enabled:
                n = len(labels) // self.dist.world_size
                rows = slice(self.dist.rank * n, (self.dist.rank + 1) * n)
            loss = self.losses[m](zm, za, labels, logit_scale=self.model[m].logit_scale, rows=rows)
            total = total + pair.weight * loss
            parts[m] = loss.detach()
            samples += len(labels)
        if rows is not None:  # each rank scored its own rows: the mean over ranks is the global batch's loss
            parts = dict(zip(parts, mean_over_ranks(torch.stack(list(parts.values()))), strict=True))
        return total, parts, samples, replays

    def _labels(self, batch: BindBatch) -> Tensor:
        """The batch's labels on the device (from pinned memory on CUDA: an asynchronous copy)."""
        return batch.labels.to(self.device, non_blocking=self.device.type == "cuda")

    def _embed(self, modality: str, batch: Any, replays: list[ChunkedEmbedding]) -> torch.Tensor:
        """This rank's embeddings of ``batch``, gathered over ranks (with their gradient path)."""
        tower, encoder = self.towers[modality], self.model[modality]
        if modality not in self.caches:
            batch = move_to(batch, self.device, non_blocking=self.device.type == "cuda")
            if self.recipe.channels_last:  # the format prepare_model gave the convolutions
                batch = input_channels_last(batch)
        chunk = self.stage.chunk_size
        if encoder.frozen:  # a frozen tower needs no graph
            with torch.no_grad():
                z = tower(batch)
        elif chunk and batch_size_of(batch) > chunk:  # GradCache (bind/train/gradcache.py)
            replay = ChunkedEmbedding(tower, batch, chunk, self.device, self.autocast)
            replays.append(replay)
            z = replay.embeddings
        else:
            z = tower(batch)
        return gather_with_grad(z)

    def _reported(self, loss: Tensor, parts: dict[str, Tensor]) -> Tensor:
        """The micro-batch's loss over the global batch (a bind stage's parts already are, under local_loss too),
        the same on every rank: the update's NaN/inf decision reads it."""
        if self.stage.kind == "bind":
            return sum(pair.weight * parts[m] for m, pair in self.stage.pairs.items())
        return loss.detach()

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

    # ---- the loop -------------------------------------------------------------------------------------
    def seek(self, steps_done: int) -> None:
        """Position every loader as it stands after ``steps_done`` optimizer steps (resuming mid-stage)."""
        self.data.seek(steps_done * self.stage.optimizer.grad_accum_steps)

    def run(
        self,
        metrics: MetricsLog | None,
        checkpoints: CheckpointWriter | None = None,
        show_progress: bool = True,
        start_step: int = 0,
        stop: StopFlag | None = None,
    ) -> None:
        """Train steps ``start_step + 1 .. total_steps``; metrics and checkpoints on the main rank only."""
        stage = self.stage
        self.model.train()
        iterators = self.data.iterators()
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
        window = {"steps": 0, "data_s": 0.0}
        stage_start, stage_data_s, stage_samples = time.perf_counter(), 0.0, 0
        postfix: dict[str, Any] = {}
        for step in bar:
            done = step + 1
            result = self.train_step(iterators)
            window_samples += result.samples
            window["steps"] += 1
            window["data_s"] += result.data_s
            stage_data_s += result.data_s
            stage_samples += result.samples
            if result.stepped:
                nonfinite_in_a_row = 0
            else:  # apply_update skipped it: one bad batch must not poison the weights
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
            # log steps read the loss from the device (the one extra sync, every log_every steps); rank 0 only
            if metrics is not None and (done % stage.log_every == 0 or done == self.total_steps):
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                rate = window_samples / elapsed
                timing = {
                    "batch_s": round(elapsed / window["steps"], 5),  # wall time per step
                    "data_s": round(window["data_s"] / window["steps"], 5),  # of which blocked on the loaders
                    "data_wait_fraction": round(min(window["data_s"] / elapsed, 1.0), 4),
                }
                window_start, window_samples, window = time.perf_counter(), 0, {"steps": 0, "data_s": 0.0}
                record = self._record(done, result, rate)
                metrics.write({**record, **timing})
                postfix.update({"loss": f"{record['loss']:.3f}", "samples_s": f"{rate:.0f}"})
                postfix["data"] = f"{timing['data_wait_fraction']:.0%}"
                if self.bad_items:
                    postfix["bad"] = len(self.bad_items)
                if self.nonfinite_steps:
                    postfix["nan_skipped"] = self.nonfinite_steps
                bar.set_postfix(postfix)
            stopping = stop is not None and stop.requested(self.dist)
            every = self.recipe.checkpoint_every
            due = (every and done % every == 0) or done % self.steps_per_epoch == 0 or done == self.total_steps
            if due or stopping:  # on every rank: batch-norm statistics of all ranks, every rank's random state
                sync_batchnorm_stats(self.model)
                rng = all_rng_states(self.dist.world_size)
                if checkpoints is not None:
                    state = {"stage": stage.name, "total_steps": self.total_steps, **self.counters()}
                    checkpoints.save(done, self.model, self.optimizer, self.scheduler, state, rng)
            if stopping:
                barrier()  # no rank exits (and has torchrun stop the others) before rank 0's checkpoint is written
                bar.close()
                raise Interrupted(stop.signal_name, stage.name, done, checkpoints.last if checkpoints else None)
        bar.close()
        self.reducer.remove()  # the next stage trains other parameters, with a reducer of its own
        if stop is not None and stop.settle():  # its last step's checkpoint is written: stop there, every rank
            barrier()
            raise Interrupted(stop.signal_name, stage.name, self.total_steps, checkpoints.last if checkpoints else None)
        self.summary = self._summary(
            self.total_steps - start_step, time.perf_counter() - stage_start, stage_data_s, stage_samples
        )
        if metrics is not None:
            metrics.write(self.summary)
        if self.dist.is_main:
            log.info(
                "stage %s: %d steps in %.1f s, %.0f samples/s; %.1f%% of the time waiting for data",
                stage.name, self.summary["steps"], self.summary["seconds"], self.summary["samples_per_s"],
                100 * self.summary["data_wait_fraction"],
            )  # fmt: skip

    def _summary(self, steps: int, seconds: float, data_s: float, samples: int) -> dict[str, Any]:
        """Where a stage's time went: ``data_wait_s`` blocked on the loaders, ``compute_s`` in forward, backward
        and the update (checkpointing and logging included)."""
        seconds = max(seconds, 1e-9)
        return {
            "stage": self.stage.name,
            "event": "stage_done",
            "steps": steps,
            "seconds": round(seconds, 3),
            "data_wait_s": round(data_s, 3),
            "compute_s": round(seconds - data_s, 3),
            "data_wait_fraction": round(min(data_s / seconds, 1.0), 4),
            "samples_per_s": round(samples / seconds, 1),
        }

    def _record(self, step: int, result: StepResult, rate: float) -> dict[str, Any]:
        loss, parts, grad_norm = result.scalars()
        return {
            "stage": self.stage.name,
            "step": step,
            "loss": loss,
            "losses": parts,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": round(rate, 1),
            "grad_norm": grad_norm,
            "bad_items": len(self.bad_items),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def counters(self) -> dict[str, Any]:
        return {"bad_items": self.bad_items, "nonfinite_steps": self.nonfinite_steps}

    def restore_counters(self, state: dict[str, Any]) -> None:
        self.bad_items.update(state.get("bad_items", {}))
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
