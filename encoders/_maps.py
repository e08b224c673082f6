"""Single-channel map encoders (depth, thermal): what they share besides their loader and value scale.

A map modality reads an item to ``(H, W)`` values, scales them to [0, 1] (NaN: missing), and hands that
to :class:`MapEncoder`, which resizes, normalises and runs a one-channel trunk from :mod:`encoders._vision`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bind import ConfigError, HeadKind, InputError, ModalityEncoder

from ._vision import VIT_TINY, Trunk
from .image_io import IMAGE_SUFFIXES

UNIT_MEAN, UNIT_STD = 0.5, 0.5  # [0, 1] -> [-1, 1]
# the tiny variants every map modality registers: ViT arguments as tv_vit_b_16's, so init_from_encoder can be tested
TINY_CNN = {"width": 4, "embed_dim": 16, "image_size": 16}
TINY_VIT = {**VIT_TINY, "embed_dim": 16}


def read_map_file(path: Path, what: str, expected: str) -> tuple[np.ndarray, str | None]:
    """A ``.npy`` file's array (mode None), or an image file's pixels and PIL mode.

    A missing, empty or unreadable file is an :class:`InputError` naming ``what`` and saying ``expected``.
    """
    if not path.is_file():
        raise InputError(f"{what} does not exist; {expected}")
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); {expected}")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except (OSError, ValueError, EOFError) as err:
            raise InputError(f"{what} could not be read as a numpy array ({type(err).__name__}: {err})") from err
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img), img.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise InputError(
            f"{what} is corrupt or not an image PIL can read ({type(err).__name__}: {err}); {expected}"
        ) from err


def map_tensor(array: np.ndarray | Tensor, what: str, shape: str, values: str) -> Tensor:
    """An array or tensor ``(H, W)`` or ``(1, H, W)`` of real numbers -> a CPU tensor ``(H, W)``, dtype kept.

    ``shape`` ("a depth map") and ``values`` ("float metres or integer millimetres") say in an error what
    was expected.
    """
    tensor = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array.detach().cpu())
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise InputError(f"{what}: expected {shape} of shape (H, W) or (1, H, W) with H, W >= 1")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InputError(f"{what}: expected {values}, got dtype {tensor.dtype}")
    return tensor


def resize_map(values: Tensor, size: int) -> Tensor:
    """``(H, W)`` with NaN for missing -> ``(size, size)``: shorter side resized, centre crop.

    Missing pixels are left out of the (antialiased bilinear) interpolation, as a normalised convolution:
    an output pixel mostly made of missing input (valid weight < 0.5) is missing too.
    """
    if values.shape == (size, size):
        return values
    import torchvision.transforms.v2.functional as TF

    valid = torch.isfinite(values)
    stack = torch.stack([torch.where(valid, values, 0.0), valid.float()])
    stack = TF.center_crop(TF.resize(stack, size, antialias=True), [size, size])
    weight = stack[1]
    return torch.where(weight >= 0.5, stack[0] / weight.clamp_min(1e-6), torch.nan)


class MapEncoder(ModalityEncoder):
    """A single-channel map encoder: ``to_unit(item)`` gives ``(H, W)`` in [0, 1] (NaN: missing); then resize,
    ``(x - 0.5) / 0.5`` and missing -> 0. The depth and thermal encoders subclass it with their ``to_unit``.
    """

    file_suffixes = (".npy", *IMAGE_SUFFIXES)  # arrays, or 8/16-bit images

    def __init__(
        self,
        modality: str,
        trunk: Trunk,
        embed_dim: int,
        *,
        image_size: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__(modality, trunk.module, trunk.dim, embed_dim, head, logit_scale, learnable_logit_scale)
        if image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        self.blocks = trunk.blocks  # a plain list: the modules stay registered once, under trunk

    def to_unit(self, item: Any) -> Tensor:
        """One raw item -> ``(H, W)`` in [0, 1], NaN where a pixel is missing: what each map modality defines."""
        raise NotImplementedError

    def preprocess(self, item: Any) -> Tensor:
        """Raw map -> ``(1, image_size, image_size)``, normalised, missing pixels 0."""
        unit = resize_map(self.to_unit(item), self.image_size)
        return torch.nan_to_num((unit - UNIT_MEAN) / UNIT_STD, nan=0.0)[None]

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)
