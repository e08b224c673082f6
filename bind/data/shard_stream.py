"""Streaming shards: :class:`ShardStream` and the pretrain/bind views of it, with a seeded shuffle buffer.

How shards are split over ranks and workers, shuffled and skipped when bad is described in
:mod:`bind.data.shards`.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .decoders import decode
from .pairs import BAD_ITEM_ERRORS, MAX_SKIP, BadItem, item_generator
from .shards import ShardIndex, ShardSample, read_shard

log = logging.getLogger(__name__)


def shuffled(samples: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``samples`` in a random order drawn from a buffer of ``buffer_size`` (0 or 1: in order)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """``(decoded members, label, bad)`` for each sample of this rank's share of a shard folder.

    ``decoded members`` maps each modality column to its raw item. Subclasses override :meth:`load`.
    ``shuffle=False, shuffle_buffer=0`` reads in shard order (evaluation). ``__len__`` is the
    number of samples this rank reads in the current epoch (bad ones included).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad: bool = True,
    ) -> None:
        self.index = ShardIndex.load(path)
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if len(self.index.files) < world_size:
            raise DataError(
                f"{self.index.directory}: {len(self.index.files)} shards cannot feed {world_size} ranks; "
                "rewrite with a smaller --samples-per-shard"
            )
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.skip_bad, self.epoch = rank, world_size, skip_bad, 0
        self.offsets = np.concatenate([[0], np.cumsum(self.index.counts)])[:-1].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Indices of the shards one worker of this rank reads in ``epoch``."""
        order = np.arange(len(self.index.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[self.rank :: self.world_size][worker::num_workers].tolist()

    def __len__(self) -> int:
        return sum(self.index.counts[i] for i in self.shards_for(self.epoch))

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iterate(epoch, *((info.id, info.num_workers) if info else (0, 1)))

    def iterate(self, epoch: int, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[Any, ...]]:
        """``(*load(sample), bad)`` for the samples of one worker's shards in ``epoch``."""
        bad: list[tuple[str, str]] = []
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        in_a_row = 0
        for sample in shuffled(self._read(self.shards_for(epoch, worker, num_workers), bad), self.shuffle_buffer, rng):
            try:
                if sample.problem is not None:  # a member refused unread (sparse, over the size cap)
                    raise BadItem(sample.name, sample.problem)
                out = self.load(sample, epoch)
            except BadItem as err:
                if not self.skip_bad:
                    raise (err.__cause__ or DataError(str(err))) from None
                bad.append((err.name, err.message))
                in_a_row += 1
                if in_a_row >= MAX_SKIP:
                    raise DataError(f"{MAX_SKIP} samples in a row could not be read; the last: {err}") from None
                continue
            in_a_row = 0
            yield (*out, list(bad))
            bad.clear()  # in place: _read appends to this list
        for name, message in bad:  # after the last good sample: nothing left to report them with
            log.warning("skipped bad sample %s: %s", name, message)

    def _read(self, shards: list[int], bad: list[tuple[str, str]]) -> Iterator[ShardSample]:
        for i in shards:
            file, read, error = self.index.files[i], 0, "it ends early"
            try:
                for key, members, problem in read_shard(self.index.directory / file):
                    yield ShardSample(file, key, self.offsets[i] + read, members, problem)
                    read += 1
            except (tarfile.TarError, OSError, EOFError) as err:
                error = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line
            # tarfile takes a cut inside a header for the end of the archive: the index's count catches it
            if read < self.index.counts[i]:
                message = f"damaged tar: {read} of {self.index.counts[i]} samples read ({error}); the rest was skipped"
                if not self.skip_bad:
                    raise DataError(f"{self.index.directory / file}: {message}")
                bad.append((file, message))

    def decode(self, sample: ShardSample, column: str) -> Any:
        if column not in sample.members:
            raise BadItem(sample.name, f"no {column!r} member")
        ext, data = sample.members[column]
        return decode(ext, data, sample.name)

    def prepare(
        self, sample: ShardSample, column: str, preprocess: Callable[[Any], Any], augment: Any, epoch: int
    ) -> Any:
        """``preprocess(augment(item))`` of one column, as :class:`~bind.data.pairs.Preprocessed` does."""
        item = self.decode(sample, column)
        try:
            if augment is None:
                return preprocess(item)
            g = item_generator(self.seed, epoch, sample.ordinal)
            return augment.augment_tensor(preprocess(augment.augment_raw(item, g)), g)
        except BAD_ITEM_ERRORS as err:
            raise BadItem(sample.name, f"{column}: {err}") from err

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, ...]:
        return {c: self.decode(sample, c) for c in self.index.columns}, self.label(sample)

    def label(self, sample: ShardSample) -> int:
        """The sample's class index, checked against the index's classes; :class:`BadItem` when it is not one."""
        names = self.index.class_names
        return sample.label(len(names) if names is not None else None)


class ShardPreprocessed(ShardStream):
    """``(preprocess(augment(item)), label, bad)`` for one column: a pretrain stage's samples."""

    def __init__(
        self, path: str | os.PathLike[str], column: str, preprocess: Callable[[Any], Any], augment: Any = None, **kw
    ) -> None:
        super().__init__(path, **kw)
        self.index.check_column(column)
        self.column, self.preprocess, self.augment = column, preprocess, augment

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, int]:
        return self.prepare(sample, self.column, self.preprocess, self.augment, epoch), self.label(sample)


class ShardPairs(ShardStream):
    """``(anchor_x, x, label, bad)``: the anchor column and another column of the same sample (``pairing: row``).

    The anchor is never augmented; a bad member on either side skips the whole sample.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        anchor_column: str,
        column: str,
        anchor_preprocess: Callable[[Any], Any],
        preprocess: Callable[[Any], Any],
        augment: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(path, **kw)
        for name in (anchor_column, column):
            self.index.check_column(name)
        self.anchor_column, self.column = anchor_column, column
        self.anchor_preprocess, self.preprocess, self.augment = anchor_preprocess, preprocess, augment

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, Any, int]:
        anchor_x = self.prepare(sample, self.anchor_column, self.anchor_preprocess, None, epoch)
        return anchor_x, self.prepare(sample, self.column, self.preprocess, self.augment, epoch), self.label(sample)


def collate_with_bad(collate: Callable[[list[tuple[Any, ...]]], tuple[Any, ...]]) -> Callable[[list], tuple]:
    """A collate function for stream samples: ``(*collate(samples without bad), all bad items of the batch)``."""
    return lambda batch: (*collate([s[:-1] for s in batch]), [b for s in batch for b in s[-1]])
