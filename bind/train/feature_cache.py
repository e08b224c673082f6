"""Trunk features of frozen trunks, computed once instead of every step.

When a trunk is frozen (``freeze: trunk`` or ``all``, no unfrozen blocks) and its inputs are not
augmented, its output for an item never changes during a stage, so the trainer computes it once
and trains only what comes after it (the head). A frozen MiniLM text tower or a frozen frame
encoder then costs one pass over the data instead of one per step.

With a ``cache_dir`` the features go to disk (``features.npy``, memory-mapped when read back), so
they outlive the run and sets larger than memory work; the folder name carries a hash of the
trunk weights, the encoder's arguments and the items, so changing any of them rebuilds it.
Augmented inputs are never cached: their features change every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Items
from ..data.pairs import Key, Preprocessed, split_key
from ..distributed import SINGLE_PROCESS, Dist, barrier
from ..encoder import ClipBatch, ModalityEncoder, move_to
from ..errors import DataError

log = logging.getLogger(__name__)


class FeatureCache:
    """Per-item trunk features (each item may have several clips), in memory or memory-mapped from disk.

    ``features[offsets[i] : offsets[i + 1]]`` are the clip features of item ``i``.
    """

    def __init__(self, features: Tensor, counts: Tensor, device: torch.device | str = "cpu") -> None:
        self.features = features  # (total_clips, trunk_dim)
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
    ) -> FeatureCache:
        """Run the frozen trunk over every item once."""
        if not encoder.trunk_frozen:
            raise ValueError(f"the {encoder.modality!r} trunk trains, so its features cannot be cached")
        # a bad item gets its neighbour's features
        dataset = Preprocessed(items, encoder.preprocess, skip_bad=True, preprocess_many=encoder.preprocess_many)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=lambda b: (encoder.collate([x for x, _ in b]), dataset.drain_bad()),
            generator=torch.Generator(),  # not the global RNG: building the cache or reading it leaves that alone
        )
        features, counts, bad = [], [], []
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            bar = tqdm(loader, desc=f"cache {encoder.modality} features", unit="batch", disable=not show_progress)
            for batch, bad_items in bar:
                bad += bad_items
                batch = move_to(batch, device)
                if isinstance(batch, ClipBatch):
                    features.append(encoder.forward_features(batch.clips))
                    counts.append(torch.bincount(batch.item_index, minlength=batch.num_items).cpu())
                else:
                    out = encoder.forward_features(batch)
                    features.append(out)
                    counts.append(torch.ones(len(out), dtype=torch.long))
        encoder.train(was_training)
        cache = cls(torch.cat(features).float(), torch.cat(counts), device)
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
    ) -> FeatureCache:
        """In memory without ``cache_dir``; with it, reuse ``cache_dir/<modality>-<key>/`` or write it.

        The key hashes the encoder's trunk weights, its build arguments (which fix preprocessing) and
        the items, so a changed checkpoint, a changed preprocessing argument or other data never
        reuse stale features. Under torchrun rank 0 writes, the other ranks wait and map the file.
        """
        if cache_dir is None:
            log.info("caching %s trunk features in memory", encoder.modality)
            return cls.compute(encoder, items, device, num_workers=num_workers, show_progress=show_progress)
        key = cache_key(encoder, items)
        path = Path(cache_dir).expanduser() / f"{encoder.modality}-{key[:20]}"
        if not (path / "meta.json").is_file() and dist.is_main:
            log.info("caching %s trunk features in %s", encoder.modality, path)
            cls.compute(encoder, items, device, num_workers=num_workers, show_progress=show_progress).save(path, key)
        barrier()
        log.info("using cached %s trunk features from %s", encoder.modality, path)
        return cls.load(path, device)

    def save(self, path: Path, key: str) -> None:
        """Write atomically: into a temporary sibling folder, then one rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        np.save(tmp / "features.npy", self.features.cpu().numpy())
        np.save(tmp / "counts.npy", self.counts.numpy())
        meta = {"key": key, "items": len(self.counts), "clips": len(self.features), "dim": self.features.shape[1]}
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
            bad = json.loads((path / "meta.json").read_text()).get("bad", [])
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: feature cache is unreadable ({err}); delete the folder to rebuild it") from err
        cache = cls(features, counts, device)
        cache.bad = [tuple(b) for b in bad]
        return cache

    def __len__(self) -> int:
        return len(self.counts)

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """Features of items ``indices``: ``(features, item_index or None, num_items)`` for ``embed_features``."""
        indices = indices.cpu()
        source = self.features.device
        if self.single_clip:
            return self.features[indices.to(source)].to(self.device, non_blocking=True), None, len(indices)
        counts = self.counts[indices]
        starts = torch.repeat_interleave(self.offsets[indices], counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        rows = (starts + within).to(source)
        item_index = torch.repeat_interleave(torch.arange(len(indices)), counts).to(self.device)
        return self.features[rows].to(self.device, non_blocking=True), item_index, len(indices)


def cache_key(encoder: ModalityEncoder, items: Items) -> str:
    """SHA-256 of the trunk's weights, the encoder's build arguments and the items' names and labels."""
    h = hashlib.sha256()
    h.update(json.dumps([type(encoder).__qualname__, encoder.build_args], sort_keys=True, default=str).encode())
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
