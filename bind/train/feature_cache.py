"""Trunk features of frozen trunks, computed once instead of every step.

When a trunk is frozen (``freeze: trunk`` or ``all``, no unfrozen blocks) and its inputs are not
augmented, its output for an item never changes during a stage, so the trainer computes it once
and trains only what comes after it (the head). A frozen MiniLM text tower or a frozen frame
encoder then costs one pass over the data instead of one per step.

Features live in host memory, in the training dtype, and go to the device a batch at a time
(:meth:`FeatureCache.gather`): a cache the size of the data set never takes GPU memory. They are
computed under the training step's autocast, so the head sees the same input cached or not. Under
torchrun each rank computes a contiguous shard of the items, and the shards are exchanged in
bounded chunks: no rank works alone while the others wait in a collective (NCCL times out after
ten minutes), and no step needs the whole set on one GPU.

With a ``cache_dir`` the features go to disk (``features.npy``, memory-mapped when read back), so
they outlive the run; the folder name carries a hash of the trunk weights, the encoder's arguments,
the items, the feature dtype and the autocast, so changing any of them rebuilds it. Augmented
inputs are never cached: their features change every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Items
from ..data.pairs import Key, Preprocessed, split_key
from ..distributed import SINGLE_PROCESS, Dist, barrier
from ..encoder import ClipBatch, ModalityEncoder, move_to
from ..errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # the most one collective moves while shards are exchanged
Autocast = Callable[[], AbstractContextManager]


class FeatureCache:
    """Per-item trunk features (each item may have several clips), in host memory or memory-mapped from disk.

    ``features[offsets[i] : offsets[i + 1]]`` are the clip features of item ``i``; :meth:`gather` moves the
    rows of a batch to ``device``.
    """

    def __init__(self, features: Tensor, counts: Tensor, device: torch.device | str = "cpu") -> None:
        self.features = features  # (total_clips, trunk_dim), on the host
        self.counts = counts  # (num_items,)
        self.device = torch.device(device)  # where gathered features go
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)])
        self.single_clip = bool((self.counts == 1).all())
        self.bad: list[tuple[str, str]] = []  # (item name, error) of items skipped while building

    @classmethod
    def compute(
        cls,
        encoder: ModalityEncoder,
        items: Items,
        device: torch.device,
        batch_size: int = 256,
        num_workers: int = 0,
        show_progress: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        autocast: Autocast = nullcontext,
        shard: range | None = None,
    ) -> FeatureCache:
        """Run the frozen trunk on ``device`` over every item once (or over the items of ``shard``, a range of
        item indices), under ``autocast``; the features come back to host memory batch by batch, in ``dtype``
        (float32 where the head would not round its input to ``dtype`` itself: see :func:`feature_dtype`)."""
        if not encoder.trunk_frozen:
            raise ValueError(f"the {encoder.modality!r} trunk trains, so its features cannot be cached")
        dtype = feature_dtype(encoder, dtype)
        rows = range(len(items)) if shard is None else shard
        # a bad item gets its neighbour's features (the neighbour may lie in another rank's shard)
        dataset = Preprocessed(items, encoder.preprocess, skip_bad=True, preprocess_many=encoder.preprocess_many)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=rows,
            num_workers=num_workers,
            collate_fn=lambda b: (encoder.collate([x for x, _ in b]), dataset.drain_bad()),
            generator=torch.Generator(),  # not the global RNG: building the cache or reading it leaves that alone
        )
        single: Tensor | None = None  # one clip per item: rows known up front, written in place
        parts, clip_counts, bad, filled = [], [], [], 0
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                bar = tqdm(loader, desc=f"cache {encoder.modality} features", unit="batch", disable=not show_progress)
                for batch, bad_items in bar:
                    bad += bad_items
                    if isinstance(batch, ClipBatch):
                        clip_counts.append(torch.bincount(batch.item_index, minlength=batch.num_items))
                        with autocast():
                            out = encoder.forward_features(move_to(batch.clips, device))
                        parts.append(out.to(dtype).cpu())
                        continue
                    with autocast():
                        out = encoder.forward_features(move_to(batch, device))
                    if single is None:
                        single = torch.empty((len(rows), *out.shape[1:]), dtype=dtype)
                    single[filled : filled + len(out)].copy_(out.to(dtype))  # to the host, this batch only
                    filled += len(out)
        finally:
            encoder.train(was_training)
        if single is not None:
            features, counts = single, torch.ones(len(rows), dtype=torch.long)
        elif parts:
            features, counts = torch.cat(parts), torch.cat(clip_counts)
        else:  # an empty shard
            features, counts = torch.empty(0, encoder.trunk_dim, dtype=dtype), torch.zeros(0, dtype=torch.long)
        cache = cls(features, counts, device)
        cache.bad = bad
        return cache

    @classmethod
    def build(
        cls,
        encoder: ModalityEncoder,
        items: Items,
        device: torch.device,
        cache_dir: str | os.PathLike[str] | None = None,
        num_workers: int = 0,
        dist: Dist = SINGLE_PROCESS,
        show_progress: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        autocast: Autocast = nullcontext,
        comm_device: torch.device | None = None,
        batch_size: int = 256,
    ) -> FeatureCache:
        """In memory without ``cache_dir``; with it, reuse ``cache_dir/<modality>-<key>/`` or write it.

        The key hashes the encoder's trunk weights, its build arguments (which fix preprocessing), the
        items, the feature dtype and the autocast, so a changed checkpoint, a changed preprocessing argument,
        other data or another precision never reuse stale features. Under torchrun every rank computes its
        shard (:func:`shard_of`); in memory the shards are exchanged so every rank holds all features, on
        disk rank 0 assembles and writes them and every rank maps the file. ``comm_device`` is where the
        collectives' tensors live (CUDA for NCCL, the CPU for gloo; default ``device``).
        """
        device = torch.device(device)
        comm_device = torch.device(comm_device if comm_device is not None else device)
        dtype = feature_dtype(encoder, dtype)
        if cache_dir is None:
            log.info("caching %s trunk features in memory", encoder.modality)
            args = (encoder, items, device, batch_size, num_workers, dist, show_progress, dtype, autocast)
            return cls._compute_over_ranks(*args, comm_device, keep_on=None)
        key = cache_key(encoder, items, dtype, autocast_mode(autocast, device))
        path = Path(cache_dir).expanduser() / f"{encoder.modality}-{key[:20]}"
        missing = not (path / "meta.json").is_file()
        if dist.enabled:  # rank 0 decides: every rank must take part in the computing, or none
            flag = torch.tensor([int(missing)], device=comm_device)
            tdist.broadcast(flag, src=0)
            missing = bool(flag.item())
        if missing:
            if dist.is_main:
                log.info("caching %s trunk features in %s", encoder.modality, path)
            args = (encoder, items, device, batch_size, num_workers, dist, show_progress, dtype, autocast)
            cache = cls._compute_over_ranks(*args, comm_device, keep_on=0)
            if dist.is_main:
                cache.save(path, key)
            del cache
        barrier()
        log.info("using cached %s trunk features from %s", encoder.modality, path)
        return cls.load(path, device)

    @classmethod
    def _compute_over_ranks(
        cls,
        encoder: ModalityEncoder,
        items: Items,
        device: torch.device,
        batch_size: int,
        num_workers: int,
        dist: Dist,
        show_progress: bool,
        dtype: torch.dtype,
        autocast: Autocast,
        comm_device: torch.device,
        keep_on: int | None,
    ) -> FeatureCache:
        """This rank's shard, then the shards of all ranks in rank order: on every rank (``keep_on`` None) or on
        rank ``keep_on`` only (the others get their own shard back)."""
        shard = shard_of(len(items), dist, batch_size)
        local = cls.compute(
            encoder,
            items,
            device,
            batch_size,
            num_workers,
            show_progress,
            dtype=dtype,
            autocast=autocast,
            shard=shard,
        )
        if not dist.enabled:
            return local
        keep = keep_on is None or dist.rank == keep_on
        features, _ = concat_over_ranks(local.features, comm_device, keep)
        counts, _ = concat_over_ranks(local.counts, comm_device, keep)
        bad_json = torch.frombuffer(bytearray(json.dumps(local.bad).encode()), dtype=torch.uint8)
        bad_bytes, sizes = concat_over_ranks(bad_json, comm_device, keep)
        if not keep:
            return local
        assert features is not None and counts is not None and bad_bytes is not None
        cache = cls(features, counts, device)
        bad = [json.loads(part.numpy().tobytes()) for part in bad_bytes.split(sizes)]
        cache.bad = [tuple(b) for rank_bad in bad for b in rank_bad]
        return cache

    def save(self, path: Path, key: str) -> None:
        """Write atomically: into a temporary sibling folder, then one rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        features = self.features.cpu()
        dtype = str(features.dtype).removeprefix("torch.")
        if features.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, read back with load's view
            features = features.view(torch.int16)
        np.save(tmp / "features.npy", features.numpy())
        np.save(tmp / "counts.npy", self.counts.numpy())
        meta = {"key": key, "items": len(self.counts), "clips": len(self.features), "dim": self.features.shape[1]}
        meta["dtype"] = dtype
        meta["bad"] = self.bad
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, path)
        except OSError:  # another process wrote the same key first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> FeatureCache:
        """Map ``features.npy`` without reading it (pages come in as items are gathered)."""
        try:
            # "c" (copy-on-write): torch needs a writable array; nothing is ever written back to the file
            features = torch.from_numpy(np.load(path / "features.npy", mmap_mode="c"))
            counts = torch.from_numpy(np.load(path / "counts.npy"))
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("dtype") == "bfloat16":
                features = features.view(torch.bfloat16)
        except (OSError, ValueError, RuntimeError) as err:
            raise DataError(f"{path}: feature cache is unreadable ({err}); delete the folder to rebuild it") from err
        cache = cls(features, counts, device)
        cache.bad = [tuple(b) for b in meta.get("bad", [])]
        return cache

    def __len__(self) -> int:
        return len(self.counts)

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """Features of items ``indices`` on ``device``: ``(features, item_index or None, num_items)`` for
        ``embed_features``.

        For CUDA the rows are gathered into pinned memory and copied without blocking: a memory-mapped or
        pageable source would make the copy synchronous. The pinned buffer comes from torch's caching host
        allocator, which does not hand it out again before the copy that reads it has finished."""
        indices = indices.cpu()
        if self.single_clip:
            return self._to_device(self._rows(indices)), None, len(indices)
        counts = self.counts[indices]
        starts = torch.repeat_interleave(self.offsets[indices], counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        item_index = torch.repeat_interleave(torch.arange(len(indices)), counts)
        return self._to_device(self._rows(starts + within)), self._to_device(item_index), len(indices)

    def _rows(self, rows: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return self.features.index_select(0, rows)
        out = torch.empty((len(rows), *self.features.shape[1:]), dtype=self.features.dtype, pin_memory=True)
        return torch.index_select(self.features, 0, rows, out=out)

    def _to_device(self, tensor: Tensor) -> Tensor:
        if self.device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)


def feature_dtype(encoder: ModalityEncoder, dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache stores: ``dtype`` when the head starts with a ``Linear`` (under autocast it rounds its
    input to the autocast dtype anyway, so ``bfloat16`` features lose nothing), else float32 (an identity head
    sends the features straight to normalisation, in float32)."""
    if dtype == torch.float32:
        return dtype
    head = encoder.head
    first = head[0] if isinstance(head, nn.Sequential) and len(head) else head
    if isinstance(first, nn.Linear) and type(encoder).forward_head is ModalityEncoder.forward_head:
        return dtype
    return torch.float32


def autocast_mode(autocast: Autocast, device: torch.device) -> str:
    """What ``autocast()`` does on ``device``'s type (``"off"`` or the dtype it computes in), for the cache key."""
    with autocast():
        if not torch.is_autocast_enabled(device.type):
            return "off"
        return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


def shard_of(num_items: int, dist: Dist, batch_size: int) -> range:
    """This rank's contiguous range of item indices: whole batches of ``batch_size``, as even as they go.

    Shards start on batch boundaries, so every rank's batches are those one process would run: the same
    kernels on the same inputs, and the same features to the bit."""
    batches = -(-num_items // batch_size)
    first, last = (dist.rank * batches) // dist.world_size, ((dist.rank + 1) * batches) // dist.world_size
    return range(min(first * batch_size, num_items), min(last * batch_size, num_items))


def concat_over_ranks(
    local: Tensor, comm_device: torch.device, keep: bool = True, chunk_bytes: int | None = None
) -> tuple[Tensor | None, list[int]]:
    """The host tensors ``local`` of all ranks (same dtype and trailing shape) concatenated along dim 0 in rank
    order, in host memory; None where ``keep`` is False. Also the rows each rank gave.

    The row counts go first; then each rank's rows are broadcast from it, at most ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`) at a time,
    through one buffer on ``comm_device`` (NCCL moves CUDA tensors only): the whole set is never on the device."""
    flat = local.contiguous().reshape(len(local), math.prod(local.shape[1:]))  # an empty shard too
    row_bytes = flat.shape[1] * flat.element_size()
    shape = torch.tensor([len(local), row_bytes], device=comm_device)
    shapes = [torch.empty_like(shape) for _ in range(tdist.get_world_size())]
    tdist.all_gather(shapes, shape)
    rows, widths = zip(*(s.tolist() for s in shapes), strict=True)
    if len(set(widths)) > 1:  # every rank sees this and stops here, so none hangs in the broadcasts below
        raise RuntimeError(f"ranks hold rows of different sizes ({list(widths)} bytes); they cannot be concatenated")
    data = flat.view(torch.uint8) if row_bytes else flat
    out = torch.empty((sum(rows), row_bytes), dtype=torch.uint8) if keep else None
    per_chunk = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, row_bytes))
    buffer = torch.empty((min(per_chunk, max(rows)), row_bytes), dtype=torch.uint8, device=comm_device)
    rank, offset = tdist.get_rank(), 0
    for src, count in enumerate(rows):
        for start in range(0, count if row_bytes else 0, per_chunk):
            part = buffer[: min(per_chunk, count - start)]
            if rank == src:
                part.copy_(data[start : start + len(part)])
            tdist.broadcast(part, src=src)
            if out is not None:
                out[offset + start : offset + start + len(part)].copy_(part)
        offset += count
    if out is None:
        return None, list(rows)
    return out.view(local.dtype).reshape(sum(rows), *local.shape[1:]), list(rows)


def cache_key(encoder: ModalityEncoder, items: Items, dtype: torch.dtype = torch.float32, autocast: str = "off") -> str:
    """SHA-256 of the trunk's weights, the encoder's build arguments, the items' names and labels, the features'
    dtype and the autocast they were computed under (:func:`autocast_mode`)."""
    h = hashlib.sha256()
    build = [type(encoder).__qualname__, encoder.build_args, str(dtype), autocast]
    h.update(json.dumps(build, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.trunk.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps(items.names).encode())
    h.update(items.labels.numpy().tobytes())
    return h.hexdigest()


class Indexed(torch.utils.data.Dataset):
    """``(index, label)`` for each item: what a loader yields for a modality whose features are cached.

    Bad items were met (and recorded) when the cache was built, so none are left here."""

    def __init__(self, items: Items) -> None:
        self.items = items
        self.bad: list[tuple[str, str]] = []  # always empty

    def __len__(self) -> int:
        return len(self.items)

    def load(self, epoch: int, index: int) -> tuple[int, int]:
        return index, int(self.items.labels[index])

    def load_many(self, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [self.load(*key) for key in keys]

    def __getitem__(self, key: Key) -> tuple[int, int]:
        return self.load(*split_key(key))

    def drain_bad(self) -> list[tuple[str, str]]:
        return []
