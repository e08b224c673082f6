"""Training-time image and video augmentation: other sizes, positions, poses, resolutions and exposures.

:class:`ImageAugment` draws one geometric and photometric transform per image: a zoom (out into a
larger canvas filled with the border colour, or in: a random resized crop), a shift into the room
the zoom leaves, a rotation, a shear, an aspect stretch, a resampling to another canvas size (as
files made by other programs at other sizes are) and a brightness and contrast change. The whole
geometry is one affine map sampled once (``torch.nn.functional.grid_sample``); content shrunk by
the zoom is first downscaled with an antialiasing filter (``torchvision.transforms.v2``), as a
camera or a resize would, so thin strokes do not alias away.

:class:`VideoAugment` applies one draw of the same transform to every frame of a clip (objects do
not jump between frames) and adds temporal jitter: a random part of the clip, played at another
frame rate.

Every image encoder registers ``ImageAugment`` and every video encoder ``VideoAugment``
(``register_encoder(..., augmenter=...)``); a recipe's ``train_data.augment`` mapping sets the
knobs. Every draw comes from the ``torch.Generator`` the dataset seeds per (seed, epoch, item).

Example (a recipe)::

    train_data:
      source: mnist
      split: train
      augment: {scale: [0.5, 1.4], rotate: 10, canvas: [28, 128]}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from .audio_augment import _uniform, view_factors
from .image_io import load_image
from .video_io import load_frames


@dataclass(frozen=True)
class Draw:
    """One image transform's random values."""

    scale: float
    aspect: float
    angle: float  # degrees
    shear: float  # degrees
    shift: tuple[float, float]  # (x, y) as fractions of the frame's width and height
    canvas: int | None  # output height in pixels (None: the input's)
    brightness: float
    contrast: float


PLAIN = Draw(scale=1.0, aspect=1.0, angle=0.0, shear=0.0, shift=(0.0, 0.0), canvas=None, brightness=1.0, contrast=1.0)


@dataclass
class ImageAugment:
    """Augment raw images (a file, PIL image, array or tensor). 0 or None turns a knob off."""

    scale: tuple[float, float] | None = (0.6, 1.3)  # content size / frame size: < 1 zooms out, > 1 zooms in
    translate: float = 0.05  # shift beyond the room the zoom leaves, as a fraction of the frame (+-)
    rotate: float = 10.0  # +- degrees
    shear: float = 0.0  # +- degrees
    aspect: tuple[float, float] | None = None  # width/height stretch of the content
    canvas: tuple[int, int] | None = None  # resample to a random height in pixels in this range (other file sizes)
    brightness: float = 0.0  # multiply by 1 +- this
    contrast: float = 0.0  # scale the deviation from the mean by 1 +- this
    p: float = 1.0  # probability that an item is transformed at all (the rest pass as they are)

    def __post_init__(self) -> None:
        for name in ("scale", "aspect"):
            value = getattr(self, name)
            if value is not None and not 0 < value[0] <= value[1]:
                raise ValueError(f"{name} must be a range [low, high] with 0 < low <= high, got {list(value)}")
        if self.canvas is not None and not 1 <= self.canvas[0] <= self.canvas[1] <= 4096:
            raise ValueError(
                f"canvas must be a range of heights [low, high] in 1..4096 pixels, got {list(self.canvas)}"
            )
        if not 0 <= self.translate <= 1 or not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1:
            raise ValueError("translate must lie in [0, 1], brightness and contrast in [0, 1)")
        if not 0 <= self.p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {self.p}")

    def passes(self, g: torch.Generator) -> bool:
        """Whether this item passes as it is (probability ``1 - p``)."""
        return self.p < 1 and torch.rand((), generator=g).item() >= self.p

    def draw(self, g: torch.Generator, gate: bool = True) -> Draw:
        """One random transform; :data:`PLAIN` for the items that pass as they are (``gate=False``: never)."""
        if gate and self.passes(g):
            return PLAIN
        scale = _uniform(g, *self.scale) if self.scale else 1.0
        room = abs(1 - scale) / 2 + self.translate  # how far the content can move and stay (mostly) in frame
        return Draw(
            scale=scale,
            aspect=math.exp(_uniform(g, *map(math.log, self.aspect))) if self.aspect else 1.0,
            angle=_uniform(g, -self.rotate, self.rotate) if self.rotate else 0.0,
            shear=_uniform(g, -self.shear, self.shear) if self.shear else 0.0,
            shift=(_uniform(g, -room, room), _uniform(g, -room, room)),
            canvas=int(torch.randint(self.canvas[0], self.canvas[1] + 1, (), generator=g)) if self.canvas else None,
            brightness=1 + _uniform(g, -self.brightness, self.brightness) if self.brightness else 1.0,
            contrast=1 + _uniform(g, -self.contrast, self.contrast) if self.contrast else 1.0,
        )

    def augment_raw(self, item: Any, g: torch.Generator) -> Tensor:
        """Raw image -> augmented float (C, H', W') in [0, 1] (channels as stored; H' = the canvas drawn)."""
        return apply_draw(load_image(item, channels=None), self.draw(g))

    def augment_tensor(self, x: Tensor, g: torch.Generator) -> Tensor:
        return x

    def test_views(self, n: int) -> list[FixedView]:
        """Up to ``n`` fixed views for test-time augmentation: the image as it is, then the content centred at
        zooms spread over ``scale`` (one view when ``scale`` is off)."""
        return [FixedView(dataclasses.replace(PLAIN, scale=s), video=False) for s in view_factors(self.scale, n)]


@dataclass(frozen=True)
class FixedView:
    """One deterministic view of an image or a video (every frame alike): a test-time augmentation."""

    draw: Draw
    video: bool

    def augment_raw(self, item: Any, g: torch.Generator) -> Tensor:
        x = frames_as_float(load_frames(item)) if self.video else load_image(item, channels=None)
        return apply_draw(x, self.draw)

    def augment_tensor(self, x: Tensor, g: torch.Generator) -> Tensor:
        return x


def apply_draw(x: Tensor, d: Draw) -> Tensor:
    """Apply one :class:`Draw` to float images ``(..., C, H, W)`` in [0, 1] (every leading index alike)."""
    if d == PLAIN:
        return x
    h, w = x.shape[-2:]
    out_h = d.canvas or h
    out_w = max(1, round(out_h * w / h))
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    fill = border_colour(x)
    # content scale in output pixels per input pixel, per axis: shrink first with an antialiasing resize
    sx, sy = d.scale * math.sqrt(d.aspect) * out_w / w, d.scale / math.sqrt(d.aspect) * out_h / h
    if min(sx, sy) < 1:
        x = TF.resize(x, [max(1, round(h * min(sy, 1))), max(1, round(w * min(sx, 1)))], antialias=True)
    theta = torch.tensor([_theta(d, out_w, out_h)], dtype=torch.float32)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), [x.shape[0], x.shape[1], out_h, out_w], align_corners=False)
    fill = fill.view(1, -1, 1, 1)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    if d.contrast != 1:
        mean = out.mean(dim=(-3, -2, -1), keepdim=True)
        out = (out - mean) * d.contrast + mean
    return (out * d.brightness).clamp(0, 1).reshape(*lead, -1, out_h, out_w)


def _theta(d: Draw, out_w: int, out_h: int) -> list[list[float]]:
    """The 2 x 3 map from output pixels (normalised) to the input (normalised) of one draw, in float64 arithmetic.

    A point of the input frame lands at ``frame @ v`` before the zoom (``v`` normalised) and at
    ``rotate @ shear @ zoom @ frame @ v + shift`` after it; this is that map's inverse, written out for 2 x 2
    matrices (a dozen torch calls on tiny tensors cost more than the resampling of a digit)."""
    a, t = math.radians(d.angle), math.tan(math.radians(d.shear))
    cos, sin = math.cos(a), math.sin(a)
    zx, zy = d.scale * math.sqrt(d.aspect), d.scale / math.sqrt(d.aspect)
    # inverse(rotate @ shear @ zoom) = inverse(zoom) @ inverse(shear) @ inverse(rotate), rotate^-1 = rotate^T
    m00, m01 = (cos + t * sin) / zx, (sin - t * cos) / zx
    m10, m11 = -sin / zy, cos / zy
    fw, fh = out_w / 2, out_h / 2  # normalised -> output pixels
    back = ((m00 / fw, m01 / fw), (m10 / fh, m11 / fh))  # output pixels (centred) -> normalised input
    sx, sy = d.shift[0] * out_w, d.shift[1] * out_h
    return [
        [back[0][0] * fw, back[0][1] * fh, -(back[0][0] * sx + back[0][1] * sy)],
        [back[1][0] * fw, back[1][1] * fh, -(back[1][0] * sx + back[1][1] * sy)],
    ]


def border_colour(x: Tensor) -> Tensor:
    """Per-channel median of the outermost pixels of ``(N, C, H, W)``: what fills the room a zoom-out leaves."""
    edges = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    return edges.transpose(0, 1).reshape(x.shape[1], -1).median(dim=1).values


@dataclass
class VideoAugment(ImageAugment):
    """Augment raw videos: one :class:`ImageAugment` draw for every frame, then temporal jitter."""

    rate: tuple[float, float] | None = (0.5, 2.0)  # playback speed: 2 skips every other frame, 0.5 shows each twice
    keep: tuple[float, float] | None = (0.6, 1.0)  # fraction of the clip kept, from a random start

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate is not None and not 0 < self.rate[0] <= self.rate[1]:
            raise ValueError(f"rate must be a range [low, high] with 0 < low <= high, got {list(self.rate)}")
        if self.keep is not None and not 0 < self.keep[0] <= self.keep[1] <= 1:
            raise ValueError(f"keep must be a range [low, high] within (0, 1], got {list(self.keep)}")

    def augment_raw(self, item: Any, g: torch.Generator) -> Tensor:
        """Raw video -> augmented float frames (T', C, H', W') in [0, 1]."""
        frames = frames_as_float(load_frames(item))
        if self.passes(g):  # p gates the whole clip: the frames, their rate and the spatial draw
            return frames
        total = frames.shape[0]
        length = max(1, round(total * _uniform(g, *self.keep))) if self.keep else total
        start = int(torch.randint(0, total - length + 1, (), generator=g))
        rate = math.exp(_uniform(g, *map(math.log, self.rate))) if self.rate else 1.0
        steps = max(1, round(length / rate))
        index = (start + np.minimum((np.arange(steps) * rate).astype(int), length - 1)).tolist()
        return apply_draw(frames[index], self.draw(g, gate=False))

    def test_views(self, n: int) -> list[FixedView]:
        """Up to ``n`` fixed views: every frame, as it is, then the content centred at zooms spread over ``scale``."""
        return [FixedView(dataclasses.replace(PLAIN, scale=s), video=True) for s in view_factors(self.scale, n)]


def frames_as_float(frames: np.ndarray) -> Tensor:
    """Frames ``(T, H, W[, C])`` (uint8, or floats in [0, 1]) -> float ``(T, C, H, W)``, alpha dropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames if frames.ndim == 4 else frames[..., None]))
    x = x.permute(0, 3, 1, 2)[:, :3]
    return x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
