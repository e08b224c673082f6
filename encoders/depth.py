"""Depth encoders: single-channel metric depth maps, as metric depth or ImageBind-style disparity.

A raw depth item is one of

- a ``.npy`` file or a 2-D array/tensor ``(H, W)`` (or ``(1, H, W)``): **float values are metres,
  integer values millimetres**;
- a 16-bit PNG (or any 16-bit image PIL reads, e.g. TIFF) in **millimetres**, the convention of Kinect,
  RealSense, NYU-v2 and SUN RGB-D exports; a 32-bit float TIFF is read as metres. An 8-bit or colour
  image is a visualisation, not a measurement, and is refused.

Pixels that are 0, negative, NaN or inf are *missing* (no sensor return): unlike other modalities, NaN
here is a value a sensor writes on purpose, so it is not an error; a map with no valid pixel is.

``preprocess``: the shorter side is resized to ``image_size`` and centre-cropped (missing pixels are left
out of the interpolation), values become [0, 1] by :func:`depth_to_unit`, then ``(x - 0.5) / 0.5``; missing
pixels are 0 after that normalisation, the middle of the range.

The trunks are the image encoders' (``depth_cnn`` as ``digits_cnn``, ``depth_vit`` as ``tv_vit_b_16`` with a
1-channel patch stem, from :mod:`encoders._vision`), so :func:`bind.train.warm_start.init_from_encoder` can start them
from image weights, as ImageBind starts its depth tower from an image-like patch stem.

Example::

    enc = create_encoder("depth_cnn", mode="disparity", embed_dim=64)
    z = enc.embed(["scene_0001_depth.png", np.full((48, 64), 2.5, np.float32)])  # (2, 64), unit norm
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bind import ConfigError, HeadKind, InputError, register_encoder

from ._maps import TINY_CNN, TINY_VIT, MapEncoder, map_tensor, read_map_file
from ._vision import Trunk, cnn_trunk, vit_trunk

DepthMode = Literal["metric", "disparity"]
# ImageBind's SUN RGB-D conversion (omnivore): disparity = baseline * focal / depth with the Kinect v1 baseline
# (0.075 m) and a focal length of ~519 px, then clamped at 75 and divided by 75 (Omnivore's DepthNorm).
KINECT_BASELINE_M = 0.075
KINECT_FOCAL_PX = 518.857
MAX_DISPARITY = 75.0


def load_depth(item: Any) -> Tensor:
    """One raw depth map -> float32 ``(H, W)`` in metres, NaN where a pixel is missing (0, < 0, NaN, inf).

    Example::

        load_depth("kinect_depth.png")          # uint16 millimetres -> metres
        load_depth(np.full((4, 4), 2.0))        # float metres
    """
    if isinstance(item, (str, os.PathLike)):
        what = f"depth file {os.fspath(item)!r}"
        depth = _read_depth_file(Path(item), what)
    elif isinstance(item, (np.ndarray, Tensor)):
        what = f"depth {type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
        depth = _to_metres(item, what)
    else:
        raise InputError(
            f"cannot read a depth map from a {type(item).__name__}; expected a .npy/.png path or a 2-D array or "
            "tensor (H, W) of depth (float: metres, integer: millimetres)"
        )
    depth = torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.nan)
    if torch.isnan(depth).all():
        raise InputError(
            f"{what} has no valid pixel: all are 0, negative, NaN or inf (missing); expected metric depth "
            "(float: metres, integer: millimetres) with at least one measured pixel"
        )
    return depth


def _read_depth_file(path: Path, what: str) -> Tensor:
    array, mode = read_map_file(path, what, "expected a .npy file (metres) or a 16-bit PNG (millimetres)")
    if mode is None or mode == "F":  # .npy, or a 32-bit float TIFF: metres
        return _to_metres(array, what)
    if mode.startswith("I"):  # "I;16", "I;16B", "I": integer millimetres
        return _to_metres(array.astype(np.int64), what)
    raise InputError(
        f"{what} is a {mode} image (8-bit or colour): a rendering of depth, not a measurement; expected a 16-bit "
        "PNG in millimetres (e.g. `Image.fromarray(depth_mm.astype(np.uint16)).save(...)`) or a .npy file in metres"
    )


def _to_metres(array: np.ndarray | Tensor, what: str) -> Tensor:
    depth = map_tensor(array, what, "a depth map", "float metres or integer millimetres")
    if depth.dtype.is_floating_point:
        return depth.float()
    return depth.double().div(1000).float()  # integers are millimetres (16-bit PNG convention)


def depth_to_unit(
    depth: Tensor,
    mode: DepthMode = "metric",
    max_depth: float = 10.0,
    focal_length: float = KINECT_FOCAL_PX,
    baseline: float = KINECT_BASELINE_M,
    max_disparity: float = MAX_DISPARITY,
) -> Tensor:
    """Depth in metres -> values in [0, 1]; NaN (missing) stays NaN.

    ``"metric"``: ``min(depth, max_depth) / max_depth``, so 2 m with ``max_depth=10`` is 0.2.
    ``"disparity"`` (ImageBind): ``min(baseline * focal_length / depth, max_disparity) / max_disparity``;
    near is large, far tends to 0, and with the Kinect constants everything closer than ~0.52 m saturates at 1.
    """
    if mode == "metric":
        return depth.clamp(max=max_depth) / max_depth
    if mode == "disparity":
        return (baseline * focal_length / depth).clamp(max=max_disparity) / max_disparity
    raise ConfigError(f"depth mode must be 'metric' or 'disparity', got {mode!r}")


@dataclass(frozen=True)
class DepthScale:
    """The arguments of :func:`depth_to_unit` an encoder applies, checked: a known mode, positive scales."""

    mode: DepthMode
    max_depth: float
    focal_length: float
    baseline: float
    max_disparity: float

    def __post_init__(self) -> None:
        if self.mode not in ("metric", "disparity"):
            raise ConfigError(f"depth mode must be 'metric' or 'disparity', got {self.mode!r}")
        scales = {k: v for k, v in asdict(self).items() if k != "mode"}
        if min(scales.values()) <= 0:
            raise ConfigError(f"{', '.join(scales)} must all be > 0, got {scales}")


class DepthEncoder(MapEncoder):
    """Depth maps in metres -> :func:`depth_to_unit` -> a single-channel trunk."""

    def __init__(self, trunk: Trunk, embed_dim: int, scale: DepthScale, **kwargs: Any) -> None:
        super().__init__("depth", trunk, embed_dim, **kwargs)
        self.depth_args = asdict(scale)

    def to_unit(self, item: Any) -> Tensor:
        return depth_to_unit(load_depth(item), **self.depth_args)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        """``n`` float32 depth maps in metres (0.5-8 m), 24 rows by 32, 36, ... columns."""
        rng = np.random.default_rng(seed)
        return [rng.uniform(0.5, 8.0, (24, 32 + 4 * i)).astype(np.float32) for i in range(n)]


@register_encoder("depth", tiny=TINY_CNN)
def depth_cnn(
    embed_dim: int = 128,
    width: int = 32,
    image_size: int = 64,
    mode: DepthMode = "metric",
    max_depth: float = 10.0,
    focal_length: float = KINECT_FOCAL_PX,
    baseline: float = KINECT_BASELINE_M,
    max_disparity: float = MAX_DISPARITY,
    head: HeadKind = "linear",
    logit_scale: float = 5.0,
    learnable_logit_scale: bool = False,
) -> DepthEncoder:
    """Small CNN for depth maps, from scratch; ``digits_cnn``'s layout on one channel, 4*width-d features.

    ``mode="metric"`` clips at ``max_depth`` metres (10: indoor); ``"disparity"`` is ImageBind's scale-free
    input (set ``focal_length``/``baseline`` to your sensor's). ImageBind keeps depth's logit scale fixed at 5.

    Example::

        enc = create_encoder("depth_cnn", mode="disparity", image_size=64, embed_dim=64)
    """
    scale = DepthScale(mode, max_depth, focal_length, baseline, max_disparity)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return DepthEncoder(cnn_trunk(width), embed_dim, scale, image_size=image_size, **head_args)


@register_encoder("depth", tiny=TINY_VIT)
def depth_vit(
    embed_dim: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    num_layers: int = 6,
    num_heads: int = 6,
    hidden_dim: int = 384,
    mlp_dim: int = 1536,
    mode: DepthMode = "disparity",
    max_depth: float = 10.0,
    focal_length: float = KINECT_FOCAL_PX,
    baseline: float = KINECT_BASELINE_M,
    max_disparity: float = MAX_DISPARITY,
    head: HeadKind = "linear",
    logit_scale: float = 5.0,
    learnable_logit_scale: bool = False,
) -> DepthEncoder:
    """ViT for depth maps (1-channel patch stem, torchvision layout), from scratch or from ``tv_vit_b_16``.

    Defaults are a small ViT-S-like tower on 64-pixel disparity maps. To start from ImageNet weights, match
    the image tower (``image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
    mlp_dim=3072``) and call ``bind.train.warm_start.init_from_encoder(depth, image)``: the RGB stem is summed to one channel.
    """
    scale = DepthScale(mode, max_depth, focal_length, baseline, max_disparity)
    trunk = vit_trunk("depth_vit", image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, channels=1)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return DepthEncoder(trunk, embed_dim, scale, image_size=image_size, **head_args)
