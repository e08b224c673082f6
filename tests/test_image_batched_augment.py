"""Which augmenters an image or video tower renders a batch at a time (``preprocess_many``): those whose per-item
result is ImageAugment's (or VideoAugment's) own, subclasses with other knobs included; any other goes item by item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from bind import create_encoder
from encoders.image_augment import PLAIN, FixedView, ImageAugment, VideoAugment, augments_as


@dataclass
class WiderZoom(ImageAugment):
    """Other defaults only: the same per-item result for its knobs."""

    scale: tuple[float, float] | None = (0.3, 1.6)


@dataclass
class Flipped(ImageAugment):
    """Another per-item result: never rendered from its draws."""

    def augment_raw(self, item: Any, g: torch.Generator) -> torch.Tensor:
        return super().augment_raw(item, g).flip(-1)


@pytest.mark.parametrize(
    ("augment", "kind", "batched"),
    [
        (ImageAugment(), ImageAugment, True),
        (WiderZoom(), ImageAugment, True),
        (Flipped(), ImageAugment, False),
        (VideoAugment(), ImageAugment, False),  # a subclass whose augment_raw reads videos
        (VideoAugment(), VideoAugment, True),
        (ImageAugment(), VideoAugment, False),
        (FixedView(PLAIN, video=False), ImageAugment, False),
        (object(), ImageAugment, False),
    ],
)
def test_augments_as(augment, kind, batched):
    assert augments_as(augment, kind) is batched


@pytest.mark.parametrize("augment", [WiderZoom(p=1.0), Flipped(p=1.0)], ids=["knobs", "own augment_raw"])
def test_a_subclass_gives_the_item_by_item_values_either_way(augment):
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(items))]
    got = enc.preprocess_many(items, augment, gens)
    gens = [torch.Generator().manual_seed(i) for i in range(len(items))]
    want = [
        augment.augment_tensor(enc.preprocess(augment.augment_raw(x, g)), g) for x, g in zip(items, gens, strict=True)
    ]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
