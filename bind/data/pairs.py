"""From raw items to training batches: preprocessing, augmentation, and pairing with the anchor.

``Preprocessed`` applies an encoder's ``preprocess`` (and augmentation) to one modality's items.
``AnchorPairs`` pairs each item of a modality with an anchor item: by label (any anchor item of
the same class, drawn afresh each epoch: concept pairing) or by row (row i with row i of a manifest).

Training datasets are indexed by ``(epoch, index)`` keys, which :class:`EpochSampler` yields, so
that random draws depend on the epoch without the dataset holding state: DataLoader workers can
then persist across epochs (no re-fork of a large process every pass) and results do not depend
on the number of workers. A plain ``index`` means epoch 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import BindError, DataError
from .datasets import Items


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one item in one epoch: the same in any worker, with any worker count."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)


Key = int | tuple[int, int]


def split_key(key: Key) -> tuple[int, int]:
    return key if isinstance(key, tuple) else (0, key)


class EpochSampler(Sampler):
    """Shuffled ``(epoch, index)`` keys; each pass over the data is the next epoch, seeded by ``(seed, epoch)``.

    In data-parallel training every rank draws the same permutation and takes its own contiguous
    ``batch_size`` slice of each global batch of ``batch_size * world_size`` keys (the role of
    ``DistributedSampler``), so the ranks' batches, concatenated in rank order, are exactly the
    batch one process would draw; an incomplete last global batch is dropped.
    """

    def __init__(self, size: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1 and size < batch_size * world_size:
            raise DataError(
                f"{size} items cannot fill one global batch of {batch_size} x {world_size} ranks; "
                "use a smaller batch_size or fewer processes"
            )
        self.size, self.seed, self.epoch = size, seed, 0
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.skip = 0  # keys to skip at the start of the next pass (resuming mid-epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next pass epoch ``epoch``, starting after its first ``batches_done`` batches."""
        self.epoch, self.skip = epoch, batches_done * self.batch_size

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        return self.size // (self.batch_size * self.world_size) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        if self.world_size > 1:
            global_batch = self.batch_size * self.world_size
            batches = order[: self.size // global_batch * global_batch].view(-1, self.world_size, self.batch_size)
            order = batches[:, self.rank].reshape(-1)
        order, self.skip = order[self.skip :], 0
        return ((epoch, int(i)) for i in order)


BAD_ITEM_ERRORS = (BindError, OSError, ValueError)  # what reading one item may raise: skip it, not the run
MAX_SKIP = 64  # consecutive bad items tried before giving up on a neighbourhood of the data


class BadItem(Exception):
    """One item could not be read or preprocessed (internal: the dataset replaces it and records it)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


class Preprocessed(Dataset):
    """``(preprocess(augment(item)), label)`` for each item of an :class:`Items`.

    With ``skip_bad`` an item that cannot be read (corrupt file, NaN array, empty text) is replaced
    by the next good item and recorded in :attr:`bad`, which the loader's collate function drains
    into the batch so the trainer can count and report it (the count survives DataLoader workers).
    Without it the error propagates (evaluation: a skipped item would change the labels).
    """

    def __init__(
        self,
        items: Items,
        preprocess: Callable[[Any], Any],
        augment: Any = None,
        seed: int = 0,
        skip_bad: bool = False,
        preprocess_many: Callable[..., list[Any]] | None = None,
    ) -> None:
        self.items, self.preprocess, self.augment, self.seed, self.skip_bad = items, preprocess, augment, seed, skip_bad
        self.preprocess_many = preprocess_many  # an encoder's batched preprocess (DataLoader's __getitems__)
        self.bad: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)

    def load(self, epoch: int, index: int) -> tuple[Any, int]:
        """One item, or :class:`BadItem` when it cannot be read."""
        try:
            item = self.items[index]
            if self.augment is None:
                return self.preprocess(item), int(self.items.labels[index])
            g = item_generator(self.seed, epoch, index)
            x = self.preprocess(self.augment.augment_raw(item, g))
            return self.augment.augment_tensor(x, g), int(self.items.labels[index])
        except BAD_ITEM_ERRORS as err:
            raise BadItem(self.items.names[index], str(err)) from err

    def load_many(self, keys: list[tuple[int, int]]) -> list[tuple[Any, int]] | None:
        """Many ``(epoch, index)`` items, through the encoder's ``preprocess_many`` at once where it has one, with
        the random draws :meth:`load` makes; ``None`` when an item is bad (then item by item finds it, and skips
        or reports it)."""
        try:
            if self.preprocess_many is None or len(keys) < 2:
                return [self.load(e, i) for e, i in keys]
            items = [self.items[i] for _, i in keys]
            generators = [item_generator(self.seed, e, i) for e, i in keys] if self.augment is not None else None
            xs = self.preprocess_many(items, self.augment, generators)
        except (BadItem, *BAD_ITEM_ERRORS):
            return None
        return [(x, int(self.items.labels[i])) for x, (_, i) in zip(xs, keys, strict=True)]

    def __getitems__(self, keys: list[Key]) -> list[tuple[Any, int]]:
        """A batch (DataLoader calls this with a batch's keys): batched where it can be, else item by item."""
        return self.load_many([split_key(k) for k in keys]) or [self[k] for k in keys]

    def __getitem__(self, key: Key) -> tuple[Any, int]:
        epoch, index = split_key(key)
        if not self.skip_bad:
            try:
                return self.load(epoch, index)
            except BadItem as err:
                raise err.__cause__ from None
        return skip_bad_items(lambda i: self.load(epoch, i), index, len(self), self.bad)

    def drain_bad(self) -> list[tuple[str, str]]:
        bad, self.bad = self.bad, []
        return bad


def skip_bad_items(load: Callable[[int], Any], index: int, size: int, bad: list[tuple[str, str]]) -> Any:
    """``load(index)``, or of the next index that loads, recording each bad one in ``bad``."""
    for step in range(min(MAX_SKIP, size)):
        try:
            return load((index + step) % size)
        except BadItem as err:
            bad.append((err.name, err.message))
    raise DataError(f"{MAX_SKIP} items in a row from {bad[-1][0]} could not be read; the last error: {bad[-1][1]}")


class AnchorPairs(Dataset):
    """``(anchor_tensor, other_tensor, label)``: each item of ``other`` with an anchor item.

    A bad item on either side is skipped as in :class:`Preprocessed`: by label, another item of
    the same class stands in; by row, the whole pair moves to the next row (rows must stay paired).
    """

    def __init__(self, anchor: Preprocessed, other: Preprocessed, pairing: str = "label", seed: int = 0) -> None:
        self.anchor, self.other, self.pairing, self.seed = anchor, other, pairing, seed
        if pairing == "row":
            if len(anchor) != len(other):
                raise DataError(
                    f"pairing 'row' needs as many anchor items as paired items, got {len(anchor)} and {len(other)}"
                )
        elif pairing == "label":
            labels = anchor.items.labels
            self.by_label = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
            missing = sorted(set(other.items.labels.tolist()) - set(self.by_label))
            if missing:
                raise DataError(f"pairing by label: classes {missing} have paired items but no anchor item")
        else:
            raise DataError(f"pairing must be 'label' or 'row', got {pairing!r}")

    def __len__(self) -> int:
        return len(self.other)

    def __getitem__(self, key: Key) -> tuple[Any, Any, int]:
        epoch, index = split_key(key)
        if self.pairing == "row":

            def load_pair(i: int) -> tuple[Any, Any, int]:
                x, label = self.other.load(epoch, i)
                return self.anchor.load(epoch, i)[0], x, label

            return skip_bad_items(load_pair, index, len(self), self.other.bad)
        x, label = skip_bad_items(lambda i: self.other.load(epoch, i), index, len(self.other), self.other.bad)
        candidates = self.by_label[label]
        g = item_generator(self.seed + 1, epoch, index)
        start = int(torch.randint(len(candidates), (), generator=g))
        anchor_x, _ = skip_bad_items(
            lambda k: self.anchor.load(epoch, int(candidates[k])), start, len(candidates), self.anchor.bad
        )
        return anchor_x, x, label

    def __getitems__(self, keys: list[Key]) -> list[tuple[Any, Any, int]]:
        """A batch: both sides through their batched preprocessing when they have it and no item is bad."""
        split = [split_key(k) for k in keys]
        other = self.other.load_many(split)
        if other is None:
            return [self[k] for k in keys]
        if self.pairing == "row":
            anchor_keys = split
        else:  # the anchor item __getitem__ would draw for each
            anchor_keys = []
            for (epoch, index), (_, label) in zip(split, other, strict=True):
                candidates = self.by_label[label]
                start = int(torch.randint(len(candidates), (), generator=item_generator(self.seed + 1, epoch, index)))
                anchor_keys.append((epoch, int(candidates[start])))
        anchor = self.anchor.load_many(anchor_keys)
        if anchor is None:
            return [self[k] for k in keys]
        return [(a, x, label) for (a, _), (x, label) in zip(anchor, other, strict=True)]

    def drain_bad(self) -> list[tuple[str, str]]:
        return self.anchor.drain_bad() + self.other.drain_bad()
