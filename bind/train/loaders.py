"""A training stage's data loaders: one per modality of the stage, each this rank's slice of the global batch.

Each loader yields :class:`~bind.train.batch.BindBatch`: a pretrain stage has one loader (its ``anchor`` is None),
a bind stage one per paired modality, its ``anchor`` the anchor's items paired row by row with ``inputs``. Items come from indexed datasets (:class:`~bind.data.pairs.Preprocessed`, paired
with the anchor by :class:`~bind.data.pairs.AnchorPairs`), from a frozen trunk's cached features (item
indices, :class:`~bind.train.feature_cache.Indexed`), or from streamed shards (:mod:`bind.data.shard_stream`).
Indexed loaders are a pure function of ``(seed, epoch, batch)`` (:class:`~bind.data.pairs.EpochSampler`),
so :meth:`StageLoaders.seek` puts them exactly where a resumed run left off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import Items, resolve_data_root
from ..data.augment import Augmenter, build_augment
from ..data.pairs import AnchorPairs, EpochSampler, Preprocessed
from ..data.shard_stream import ShardPairs, ShardPreprocessed, ShardStream, collate_with_bad
from ..distributed import Dist
from ..errors import ConfigError, DataError
from ..model import BindModel
from ..recipe import Recipe, StageSpec
from ..registry import get_encoder_info
from .batch import BindBatch
from .feature_cache import Indexed

log = logging.getLogger(__name__)


@dataclass
class StageLoaders:
    """The loaders of one stage, by modality, and the batches in one epoch of each."""

    loaders: dict[str, DataLoader]
    epoch_batches: dict[str, int]

    def add(self, modality: str, loader: DataLoader, epoch_batches: int) -> None:
        self.loaders[modality], self.epoch_batches[modality] = loader, epoch_batches

    def iterators(self) -> dict[str, Iterator[Any]]:
        """An endless iterator over each loader (each pass a new epoch)."""
        return {m: endless(loader) for m, loader in self.loaders.items()}

    def steps_per_epoch(self, grad_accum_steps: int) -> int:
        """Optimizer steps per pass over the largest training set (each step takes ``grad_accum_steps`` batches)."""
        return max(1, max(self.epoch_batches.values()) // grad_accum_steps)

    def seek(self, batches_done: int) -> None:
        """Position every loader as it stands after ``batches_done`` batches (resuming mid-stage)."""
        for modality, loader in self.loaders.items():
            epoch, batches = divmod(batches_done, self.epoch_batches[modality])
            if isinstance(loader.dataset, ShardStream):  # a stream cannot seek: its epoch restarts
                log.warning(
                    "%s: streamed shards resume at the start of epoch %d, not at batch %d", modality, epoch, batches
                )
                loader.dataset.set_epoch(epoch)
            else:
                loader.sampler.resume_at(epoch, batches)


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


def stage_augmenter(recipe: Recipe, stage: StageSpec, modality: str) -> Augmenter | None:
    """The augmenter ``modality``'s encoder provides, with the recipe's knobs; the anchor of a bind stage is never
    augmented (its space is the target)."""
    spec = recipe.modalities[modality]
    if stage.kind == "bind" and modality == recipe.anchor_modality:
        return None
    where = f"modalities.{modality}.train_data.augment"
    return build_augment(get_encoder_info(spec.encoder), spec.train_data.augment, where)


def build_stage_loaders(
    model: BindModel,
    recipe: Recipe,
    stage: StageSpec,
    train_sets: dict[str, Items],
    cached: set[str],
    dist: Dist,
    device: torch.device,
) -> StageLoaders:
    """The loaders of ``stage``; the modalities in ``cached`` yield item indices into their feature caches."""
    return _Builder(model, recipe, stage, train_sets, cached, dist, device).loaders()


@dataclass
class _Builder:
    """The pieces of :func:`build_stage_loaders`, sharing its arguments."""

    model: BindModel
    recipe: Recipe
    stage: StageSpec
    train_sets: dict[str, Items]
    cached: set[str]
    dist: Dist
    device: torch.device

    def loaders(self) -> StageLoaders:
        recipe, stage, anchor = self.recipe, self.stage, self.recipe.anchor_modality
        loaders = StageLoaders({}, {})
        if stage.kind == "pretrain":
            m, collate = stage.modality, self.collate(stage.modality)

            def single(batch: list) -> tuple:
                return None, collate([b[0] for b in batch]), torch.tensor([b[1] for b in batch])

            if recipe.modalities[m].train_data.stream:
                loaders.add(m, *self.stream_loader(self.stream(m), stage.batch_size, single))
            else:
                loaders.add(m, *self.indexed_loader(self.dataset(m), stage.batch_size, single))
            return loaders
        anchor_set = self.dataset(anchor)
        for m, pair in stage.pairs.items():
            anchor_collate, collate = self.collate(anchor), self.collate(m)

            def paired(batch: list, anchor_collate=anchor_collate, collate=collate) -> tuple:
                return (
                    anchor_collate([b[0] for b in batch]),
                    collate([b[1] for b in batch]),
                    torch.tensor([b[2] for b in batch]),
                )

            if recipe.modalities[m].train_data.stream:
                stream = self.stream(m, recipe.modalities[anchor].train_data.args["column"])
                loaders.add(m, *self.stream_loader(stream, pair.batch_size, paired))
            else:
                pairs = AnchorPairs(anchor_set, self.dataset(m), pair.pairing, recipe.seed)
                loaders.add(m, *self.indexed_loader(pairs, pair.batch_size, paired))
        return loaders

    def dataset(self, modality: str) -> Any:
        if modality in self.cached:
            return Indexed(self.train_sets[modality])
        augment, encoder = stage_augmenter(self.recipe, self.stage, modality), self.model[modality]
        return Preprocessed(
            self.train_sets[modality],
            encoder.preprocess,
            augment,
            self.recipe.seed,
            skip_bad=True,
            preprocess_many=encoder.preprocess_many,
        )

    def collate(self, modality: str) -> Callable[[list], Any]:
        return torch.tensor if modality in self.cached else self.model[modality].collate

    def local_batch(self, batch_size: int, size: int) -> int:
        world = self.dist.world_size
        if batch_size % world:
            raise ConfigError(f"stage {self.stage.name!r}: batch size {batch_size} is not divisible by {world} ranks")
        if size < world:  # a batch needs an item for every rank
            raise DataError(
                f"stage {self.stage.name!r}: {size} training item(s) for {world} ranks; each rank needs at least one "
                "item per batch: add data or run on fewer processes"
            )
        return min(batch_size, size) // world  # each rank's slice of the global batch

    def stream(self, modality: str, anchor_column: str | None = None) -> ShardStream:
        """This rank's share of ``modality``'s training shards; with ``anchor_column``, paired with the anchor's."""
        spec, recipe = self.recipe.modalities[modality].train_data, self.recipe
        path = Path(spec.args["path"])
        path = path if path.is_absolute() else resolve_data_root(recipe.data_root) / path
        options = {
            "augment": stage_augmenter(recipe, self.stage, modality),
            "shuffle_buffer": spec.shuffle_buffer,
            "seed": recipe.seed,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
        }
        preprocess = self.model[modality].preprocess
        if anchor_column is None:
            return ShardPreprocessed(path, spec.args["column"], preprocess, **options)
        anchor_preprocess = self.model[recipe.anchor_modality].preprocess
        return ShardPairs(path, anchor_column, spec.args["column"], anchor_preprocess, preprocess, **options)

    def stream_loader(self, stream: ShardStream, batch_size: int, collate) -> tuple[DataLoader, int]:
        """Batches from a shard stream; an epoch is the shards' sample count over the global batch, on every rank."""
        local_batch = self.local_batch(batch_size, stream.index.samples)
        epoch_batches = max(1, stream.index.samples // (local_batch * self.dist.world_size))
        workers = self.recipe.num_workers
        loader = DataLoader(
            stream,
            batch_size=local_batch,
            drop_last=True,
            collate_fn=lambda batch: BindBatch(*collate_with_bad(collate)(batch)),
            generator=torch.Generator().manual_seed(self.recipe.seed),  # not the global RNG
            num_workers=workers,
            persistent_workers=workers > 0,  # each pass of a persistent worker is the stream's next epoch
            pin_memory=self.device.type == "cuda",
        )
        return loader, epoch_batches

    def indexed_loader(self, dataset: Any, batch_size: int, collate) -> tuple[DataLoader, int]:
        """Batches of ``collate(items)``, plus the bad items met on the way (drained in the worker that met them)."""
        workers, world = self.recipe.num_workers, self.dist.world_size
        local_batch = self.local_batch(batch_size, len(dataset))
        loader = DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=EpochSampler(len(dataset), self.recipe.seed, local_batch, self.dist.rank, world),
            drop_last=True,
            collate_fn=lambda batch: BindBatch(*collate(batch), dataset.drain_bad()),
            # its own generator: a new pass must not draw from the global RNG, or a resumed run would differ
            generator=torch.Generator().manual_seed(self.recipe.seed),
            num_workers=workers,
            persistent_workers=workers > 0,  # workers live across epochs: the sampler's keys carry the epoch
            pin_memory=self.device.type == "cuda",
        )
        return loader, len(dataset) // (local_batch * world)
