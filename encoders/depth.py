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

The trunks are laid out like the image encoders' (``depth_cnn`` as ``digits_cnn``, ``depth_vit`` as
``tv_vit_b_16`` with a 1-channel patch stem), so :func:`bind.init.init_from_encoder` can start them from
image weights, as ImageBind starts its depth tower from an image-like patch stem.

Example::

    enc = create_encoder("depth_cnn", mode="disparity", embed_dim=64)
    z = enc.embed(["scene_0001_depth.png", np.full((48, 64), 2.5, np.float32)])  # (2, 64), unit norm
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from bind import ConfigError, InputError, ModalityEncoder, register_encoder
from bind.encoder import HeadKind

# the tiny ViT is tv_vit_b_16's, so a test can start one from the other with init_from_encoder
from .image import _VIT_TINY, IMAGE_SUFFIXES, _conv_block

DepthMode = Literal["metric", "disparity"]
# ImageBind's SUN RGB-D conversion (omnivore): disparity = baseline * focal / depth with the Kinect v1 baseline
# (0.075 m) and a focal length of ~519 px, then clamped at 75 and divided by 75 (Omnivore's DepthNorm).
KINECT_BASELINE_M = 0.075
KINECT_FOCAL_PX = 518.857
MAX_DISPARITY = 75.0
UNIT_MEAN, UNIT_STD = 0.5, 0.5  # [0, 1] -> [-1, 1]


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
    if not path.is_file():
        raise InputError(f"{what} does not exist; expected a .npy file (metres) or a 16-bit PNG (millimetres)")
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); expected a .npy file (metres) or a 16-bit PNG (millimetres)")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise InputError(f"{what} could not be read as a numpy array ({type(err).__name__}: {err})") from err
        return _to_metres(array, what)
    try:
        with Image.open(path) as img:
            mode, array = img.mode, np.array(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise InputError(
            f"{what} is corrupt or not an image PIL can read ({type(err).__name__}: {err}); expected a 16-bit PNG "
            "in millimetres or a .npy file in metres"
        ) from err
    if mode.startswith("I"):  # "I;16", "I;16B", "I": integer millimetres
        return _to_metres(array.astype(np.int64), what)
    if mode == "F":  # 32-bit float TIFF: metres
        return _to_metres(array, what)
    raise InputError(
        f"{what} is a {mode} image (8-bit or colour): a rendering of depth, not a measurement; expected a 16-bit "
        "PNG in millimetres (e.g. `Image.fromarray(depth_mm.astype(np.uint16)).save(...)`) or a .npy file in metres"
    )


def _to_metres(array: np.ndarray | Tensor, what: str) -> Tensor:
    depth = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array.detach().cpu())
    if depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[0]
    if depth.ndim != 2 or 0 in depth.shape:
        raise InputError(f"{what}: expected a depth map of shape (H, W) or (1, H, W) with H, W >= 1")
    if depth.dtype == torch.bool or depth.is_complex():
        raise InputError(f"{what}: expected float metres or integer millimetres, got dtype {depth.dtype}")
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


def resize_map(values: Tensor, size: int) -> Tensor:
    """``(H, W)`` with NaN for missing -> ``(size, size)``: shorter side resized, centre crop.

    Missing pixels are left out of the (antialiased bilinear) interpolation, as a normalised convolution:
    an output pixel mostly made of missing input (valid weight < 0.5) is missing too.
    """
    if values.shape == (size, size):
        return values
    valid = torch.isfinite(values)
    stack = torch.stack([torch.where(valid, values, 0.0), valid.float()])
    stack = TF.center_crop(TF.resize(stack, size, antialias=True), [size, size])
    weight = stack[1]
    return torch.where(weight >= 0.5, stack[0] / weight.clamp_min(1e-6), torch.nan)


class MapEncoder(ModalityEncoder):
    """A single-channel map encoder: ``to_unit(item)`` gives ``(H, W)`` in [0, 1] (NaN: missing); then resize,
    ``(x - 0.5) / 0.5`` and missing -> 0. Shared by the depth and thermal encoders.
    """

    file_suffixes = (".npy", *IMAGE_SUFFIXES)  # arrays, or 8/16-bit images

    def __init__(
        self,
        modality: str,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int,
        *,
        image_size: int,
        block_names: Sequence[str],
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__(modality, trunk, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        if image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        self.block_names = list(block_names)

    def to_unit(self, item: Any) -> Tensor:
        raise NotImplementedError

    def preprocess(self, item: Any) -> Tensor:
        """Raw map -> ``(1, image_size, image_size)``, normalised, missing pixels 0."""
        unit = resize_map(self.to_unit(item), self.image_size)
        return torch.nan_to_num((unit - UNIT_MEAN) / UNIT_STD, nan=0.0)[None]

    def trunk_blocks(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in self.block_names]


class DepthEncoder(MapEncoder):
    """Depth maps in metres -> :func:`depth_to_unit` -> a single-channel trunk."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, embed_dim: int, *, depth_args: dict, **kwargs: Any) -> None:
        super().__init__("depth", trunk, trunk_dim, embed_dim, **kwargs)
        if depth_args["mode"] not in ("metric", "disparity"):
            raise ConfigError(f"depth mode must be 'metric' or 'disparity', got {depth_args['mode']!r}")
        scales = {k: v for k, v in depth_args.items() if k != "mode"}
        if min(scales.values()) <= 0:
            raise ConfigError(f"{', '.join(scales)} must all be > 0, got {scales}")
        self.depth_args = depth_args

    def to_unit(self, item: Any) -> Tensor:
        return depth_to_unit(load_depth(item), **self.depth_args)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        """``n`` float32 depth maps in metres (0.5-8 m), 24 rows by 32, 36, ... columns."""
        rng = np.random.default_rng(seed)
        return [rng.uniform(0.5, 8.0, (24, 32 + 4 * i)).astype(np.float32) for i in range(n)]


def cnn_trunk(width: int) -> nn.Sequential:
    """``digits_cnn``'s trunk on one channel: the same parameter names, so image weights load into it."""
    return nn.Sequential(
        _conv_block(1, width, 2, pool=True),
        _conv_block(width, 2 * width, 2, pool=True),
        _conv_block(2 * width, 4 * width, 1, pool=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def vit_trunk(
    image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int
) -> tuple[nn.Module, list[str]]:
    """torchvision's ViT (``tv_vit_b_16``'s parameter names) with a 1-channel patch stem; and its block names."""
    if image_size % patch_size:
        raise ConfigError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    model = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    model.heads = nn.Identity()
    model.conv_proj = nn.Conv2d(1, hidden_dim, patch_size, patch_size)
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / patch_size**2))  # torchvision's stem init
    nn.init.zeros_(model.conv_proj.bias)
    return model, [f"trunk.encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]


@register_encoder("depth", tiny={"width": 4, "embed_dim": 16, "image_size": 16})
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
    depth_args = {
        "mode": mode,
        "max_depth": max_depth,
        "focal_length": focal_length,
        "baseline": baseline,
        "max_disparity": max_disparity,
    }
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return DepthEncoder(
        cnn_trunk(width),
        4 * width,
        embed_dim,
        depth_args=depth_args,
        image_size=image_size,
        block_names=["trunk.0", "trunk.1", "trunk.2"],
        **head_args,
    )


@register_encoder("depth", tiny={**_VIT_TINY, "embed_dim": 16})
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
    mlp_dim=3072``) and call ``bind.init.init_from_encoder(depth, image)``: the RGB stem is summed to one channel.
    """
    depth_args = {
        "mode": mode,
        "max_depth": max_depth,
        "focal_length": focal_length,
        "baseline": baseline,
        "max_disparity": max_disparity,
    }
    trunk, blocks = vit_trunk(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return DepthEncoder(
        trunk, hidden_dim, embed_dim, depth_args=depth_args, image_size=image_size, block_names=blocks, **head_args
    )
