"""Thermal encoders: single-channel infrared images (radiometric counts or temperatures).

A raw thermal item is one of

- an 8-bit or 16-bit PNG (any image PIL reads): raw counts, 0-255 or 0-65535, *not* rescaled, so a
  fixed ``value_range`` is in the camera's counts. A 3-channel image whose channels are equal (LLVIP
  stores its infrared frames so) is read as one channel; a false-colour rendering (channels differ) is refused;
- a ``.npy`` file or a 2-D array/tensor ``(H, W)`` (or ``(1, H, W)``) of counts or temperatures (kelvin or
  Celsius: any unit, as long as ``value_range`` uses the same one).

NaN or inf values are an error (a thermal camera has no "missing" pixel).

``normalize="minmax"`` (default) maps each image's coldest pixel to 0 and hottest to 1, so units and camera
gain do not matter but absolute temperature is lost; ``"fixed"`` clips to ``value_range=(low, high)`` and
scales to [0, 1], keeping absolute temperature (e.g. ``(273.15, 313.15)`` kelvin for 0-40 degC scenes).
Then, as for depth, resize (shorter side, centre crop) and ``(x - 0.5) / 0.5``.

Example::

    enc = create_encoder("thermal_cnn", normalize="fixed", value_range=(20.0, 40.0))   # Celsius arrays
    z = enc.embed([np.full((60, 80), 25.0, np.float32), "frame_0001.npy"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bind import ConfigError, HeadKind, InputError, register_encoder

from ._maps import TINY_CNN, TINY_VIT, MapEncoder, map_tensor, read_map_file
from ._vision import Trunk, cnn_trunk, vit_trunk

ThermalNorm = Literal["minmax", "fixed"]


def load_thermal(item: Any) -> Tensor:
    """One raw thermal image -> float32 ``(H, W)`` in its own units (counts, kelvin or Celsius), all finite.

    Example::

        load_thermal("flir_0001.png")     # 16-bit counts, unscaled
    """
    if isinstance(item, (str, os.PathLike)):
        what = f"thermal file {os.fspath(item)!r}"
        array = _read_thermal_file(Path(item), what)
    elif isinstance(item, (np.ndarray, Tensor)):
        what = f"thermal {type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
        array = item
    else:
        raise InputError(
            f"cannot read a thermal image from a {type(item).__name__}; expected a .png/.npy path or a 2-D array "
            "or tensor (H, W) of counts or temperatures"
        )
    image = map_tensor(array, what, "a single-channel image", "integer counts or float temperatures").float()
    if not torch.isfinite(image).all():
        raise InputError(f"{what} holds NaN or inf values; expected finite counts or temperatures")
    return image


def _read_thermal_file(path: Path, what: str) -> np.ndarray:
    array, mode = read_map_file(path, what, "expected an 8/16-bit PNG of counts or a .npy array")
    if mode is None or mode in ("L", "F"):
        return array
    if mode.startswith("I"):
        return array.astype(np.int64)  # uint16 counts; int64 so torch takes them
    if mode in ("RGB", "RGBA") and (array[..., :3] == array[..., :1]).all():
        return array[..., 0]  # grey stored as RGB
    raise InputError(
        f"{what} is a {mode} image whose channels differ: a false-colour rendering, not raw intensities; "
        "expected a single-channel (8- or 16-bit) thermal image"
    )


def thermal_to_unit(
    image: Tensor, normalize: ThermalNorm = "minmax", value_range: Sequence[float] | None = None
) -> Tensor:
    """Counts or temperatures -> [0, 1]: per-image min-max, or a fixed ``value_range`` (clipped).

    A uniform image is all 0 under ``"minmax"``.
    """
    if normalize == "minmax":
        low, high = image.min(), image.max()
        return (image - low) / (high - low) if high > low else torch.zeros_like(image)
    if normalize == "fixed":
        low, high = _check_range(value_range)
        return ((image - low) / (high - low)).clamp(0, 1)
    raise ConfigError(f"thermal normalize must be 'minmax' or 'fixed', got {normalize!r}")


def _check_range(value_range: Sequence[float] | None) -> tuple[float, float]:
    if value_range is None or len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ConfigError(
            f"normalize='fixed' needs value_range=(low, high) with low < high in the data's units (counts, kelvin "
            f"or Celsius), got {value_range!r}"
        )
    return float(value_range[0]), float(value_range[1])


class ThermalEncoder(MapEncoder):
    """Thermal images -> :func:`thermal_to_unit` -> a single-channel trunk."""

    def __init__(
        self,
        trunk: Trunk,
        embed_dim: int,
        *,
        normalize: ThermalNorm,
        value_range: Sequence[float] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__("thermal", trunk, embed_dim, **kwargs)
        if normalize not in ("minmax", "fixed"):
            raise ConfigError(f"thermal normalize must be 'minmax' or 'fixed', got {normalize!r}")
        self.normalize = normalize
        self.value_range = _check_range(value_range) if normalize == "fixed" else None

    def to_unit(self, item: Any) -> Tensor:
        return thermal_to_unit(load_thermal(item), self.normalize, self.value_range)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        """``n`` uint16 frames of raw counts (7000-9000), 24 rows by 32, 36, ... columns."""
        rng = np.random.default_rng(seed)
        return [rng.integers(7000, 9000, (24, 32 + 4 * i), dtype=np.uint16) for i in range(n)]


@register_encoder("thermal", tiny=TINY_CNN)
def thermal_cnn(
    embed_dim: int = 128,
    width: int = 32,
    image_size: int = 64,
    normalize: ThermalNorm = "minmax",
    value_range: Sequence[float] | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 10.0,
    learnable_logit_scale: bool = False,
) -> ThermalEncoder:
    """Small CNN for thermal images, from scratch; ``digits_cnn``'s layout on one channel, 4*width-d features.

    ImageBind keeps thermal's logit scale fixed at 10. Example::

        enc = create_encoder("thermal_cnn", normalize="fixed", value_range=(7000, 9000))  # 16-bit counts
    """
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    trunk = cnn_trunk(width)
    return ThermalEncoder(
        trunk, embed_dim, normalize=normalize, value_range=value_range, image_size=image_size, **head_args
    )


@register_encoder("thermal", tiny=TINY_VIT)
def thermal_vit(
    embed_dim: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    num_layers: int = 6,
    num_heads: int = 6,
    hidden_dim: int = 384,
    mlp_dim: int = 1536,
    normalize: ThermalNorm = "minmax",
    value_range: Sequence[float] | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 10.0,
    learnable_logit_scale: bool = False,
) -> ThermalEncoder:
    """ViT for thermal images (1-channel patch stem, torchvision layout), from scratch or from ``tv_vit_b_16``.

    To start from ImageNet weights, match the image tower's architecture arguments and call
    ``bind.train.warm_start.init_from_encoder(thermal, image)``.
    """
    trunk = vit_trunk("thermal_vit", image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, channels=1)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return ThermalEncoder(
        trunk, embed_dim, normalize=normalize, value_range=value_range, image_size=image_size, **head_args
    )
