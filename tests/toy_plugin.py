"""A toy binding problem as a plugin would add one: two views of four latent classes, and an MLP tower per view.

``toy_clusters`` items are vectors: a class's latent code seen through a view's own fixed linear map
(view ``a`` or ``b``), under noise, next to nuisance dimensions of larger variance that carry no class.
A random tower mixes the two, so classes are barely separable before training; a tower that learns
to look at the class dimensions separates them. Tests train on it in about a second.
"""

from __future__ import annotations

import torch
from torch import nn

from bind import Items, ModalityEncoder, register_dataset, register_encoder

CLASSES, LATENT, SIGNAL, NUISANCE = 4, 4, 8, 24
NUISANCE_STD, LATENT_NOISE = 2.0, 0.3


@register_dataset("toy_clusters")
def toy_clusters(root, split: str, view: str = "a", per_class: int = 256) -> Items:
    """``per_class`` items of each class in ``view``; train and eval draw different noise."""
    fixed = torch.Generator().manual_seed(1234)  # the same classes and views in every split
    codes = torch.randn(CLASSES, LATENT, generator=fixed) * 2.0
    views = {name: torch.randn(LATENT, SIGNAL, generator=fixed) for name in ("a", "b")}
    g = torch.Generator().manual_seed({"train": 0, "eval": 1}[split] * 10 + ord(view))
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    latent = codes[labels] + LATENT_NOISE * torch.randn(len(labels), LATENT, generator=g)
    signal = latent @ views[view]
    nuisance = NUISANCE_STD * torch.randn(len(labels), NUISANCE, generator=g)
    items = torch.cat([signal, nuisance], 1)
    return Items(list(items), labels, class_names=[str(c) for c in range(CLASSES)])


class ToyEncoder(ModalityEncoder):
    def __init__(self, modality: str, embed_dim: int, width: int) -> None:
        trunk = nn.Sequential(nn.Linear(SIGNAL + NUISANCE, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        super().__init__(modality, trunk, width, embed_dim, logit_scale=10.0)

    def preprocess(self, item) -> torch.Tensor:
        return torch.as_tensor(item, dtype=torch.float32)

    def example_inputs(self, n: int, seed: int = 0) -> list[torch.Tensor]:
        return list(torch.randn(n, SIGNAL + NUISANCE, generator=torch.Generator().manual_seed(seed)))


@register_encoder("toy_a")
def toy_a(embed_dim: int = 16, width: int = 32) -> ModalityEncoder:
    """View a of the toy problem (the anchor)."""
    return ToyEncoder("toy_a", embed_dim, width)


@register_encoder("toy_b")
def toy_b(embed_dim: int = 16, width: int = 32) -> ModalityEncoder:
    """View b of the toy problem (bound to the anchor)."""
    return ToyEncoder("toy_b", embed_dim, width)
