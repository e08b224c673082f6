"""Trunk features of frozen trunks, computed once instead of every step.

When a trunk is frozen (``freeze: trunk`` or ``all``, no unfrozen blocks) and its inputs are not
augmented, its output for an item never changes during a stage, so the trainer computes it once
and trains only what comes after it (the head). A frozen MiniLM text tower or a frozen frame
encoder then costs one pass over the data instead of one per step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import Items
from .data.pairs import Key, Preprocessed, split_key
from .encoder import ClipBatch, ModalityEncoder, move_to


class FeatureCache:
    """Per-item trunk features (each item may have several clips), kept on ``device``."""

    def __init__(
        self, encoder: ModalityEncoder, items: Items, device: torch.device, batch_size: int = 256, num_workers: int = 0
    ) -> None:
        if not encoder.trunk_frozen:
            raise ValueError(f"the {encoder.modality!r} trunk trains, so its features cannot be cached")
        loader = DataLoader(
            Preprocessed(items, encoder.preprocess),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=lambda b: encoder.collate([x for x, _ in b]),
        )
        features, counts = [], []
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            for batch in loader:
                batch = move_to(batch, device)
                if isinstance(batch, ClipBatch):
                    features.append(encoder.forward_features(batch.clips))
                    counts.append(torch.bincount(batch.item_index, minlength=batch.num_items).cpu())
                else:
                    out = encoder.forward_features(batch)
                    features.append(out)
                    counts.append(torch.ones(len(out), dtype=torch.long))
        encoder.train(was_training)
        self.features = torch.cat(features)  # (total_clips, trunk_dim)
        self.counts = torch.cat(counts)  # (num_items,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)])
        self.single_clip = bool((self.counts == 1).all())

    def __len__(self) -> int:
        return len(self.counts)

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """Features of items ``indices``: ``(features, item_index or None, num_items)`` for ``embed_features``."""
        indices = indices.cpu()
        if self.single_clip:
            return self.features[indices.to(self.features.device)], None, len(indices)
        counts = self.counts[indices]
        starts = torch.repeat_interleave(self.offsets[indices], counts)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        rows = (starts + within).to(self.features.device)
        item_index = torch.repeat_interleave(torch.arange(len(indices)), counts).to(self.features.device)
        return self.features[rows], item_index, len(indices)


class Indexed(torch.utils.data.Dataset):
    """``(index, label)`` for each item: what a loader yields for a modality whose features are cached."""

    def __init__(self, items: Items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key) -> tuple[int, int]:
        index = split_key(key)[1]
        return index, int(self.items.labels[index])
