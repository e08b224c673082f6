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
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
        import torchvision.transforms.v2.functional as TF

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


def render(
    images: Sequence[Tensor], draws: Sequence[Draw], size: tuple[int, int], fills: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """``resize(apply_draw(x, draw), size)`` for many float images ``(..., C, H, W)`` in [0, 1] at once (the
    frames of a clip are one image with leading dims: one draw, one border colour), to float precision.

    ``fills``: each image's border colour ``(C,)`` where it is not its own (a clip's kept frames render only
    those the encoder uses). The antialiased resizes are the linear maps ``torchvision`` applies
    (:func:`resize_matrix`), so the transform is a few batched operations per group of images of one
    shape instead of a dozen small ones per image: what a DataLoader worker runs for a batch (see
    ``ImageEncoder.preprocess_many``)."""
    out: list[Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for shape, rows in groups.items():
        h, w = shape[-2:]
        plain = [i for i in rows if draws[i] == PLAIN]
        if plain:
            x = torch.stack([images[i] for i in plain]).flatten(1, -3)
            for i, y in zip(plain, _resize(x, [(h, w)] * len(x), size), strict=True):
                out[i] = y.view(*shape[:-2], *size)
        drawn = sorted((i for i in rows if draws[i] != PLAIN), key=lambda i: draws[i].canvas or h)
        chunk: list[int] = []
        for i in drawn:  # chunks of similar canvases: little padding, bounded memory
            canvas = _canvas(draws[i], h, w)
            if chunk and (len(chunk) + 1) * canvas[0] * canvas[1] > _CHUNK_PIXELS:
                _render_chunk(images, draws, fills, chunk, size, out)
                chunk = []
            chunk.append(i)
        if chunk:
            _render_chunk(images, draws, fills, chunk, size, out)
    return out  # type: ignore[return-value]


_CHUNK_PIXELS = 1 << 20  # canvas pixels per channel rendered at once
_MATRIX_PIXELS = 256 * 256  # larger canvases are resized with torchvision's kernel, image by image


def _canvas(d: Draw, h: int, w: int) -> tuple[int, int]:
    out_h = d.canvas or h
    return out_h, max(1, round(out_h * w / h))


def _render_chunk(
    images: Sequence[Tensor],
    draws: Sequence[Draw],
    fills: Sequence[Tensor | None] | None,
    rows: list[int],
    size: tuple[int, int],
    out: list[Tensor | None],
) -> None:
    """:func:`apply_draw` then the resize to ``size`` for ``rows`` (one shape), padded to the largest canvas."""
    shape = images[rows[0]].shape
    c, h, w = shape[-3:]
    x = torch.stack([images[i] for i in rows]).view(len(rows), -1, c, h, w)  # (N, frames, C, H, W)
    fill = _border_colours(x) if fills is None else torch.stack([fills[i] for i in rows])  # type: ignore[misc]
    z = (x - fill[:, None, :, None, None]).flatten(1, 2)  # grid_sample's zero padding is now the border colour
    canvases = [_canvas(draws[i], h, w) for i in rows]
    big_h, big_w = max(c[0] for c in canvases), max(c[1] for c in canvases)
    thetas = []
    for k, (i, (out_h, out_w)) in enumerate(zip(rows, canvases, strict=True)):
        d = draws[i]
        sx, sy = d.scale * math.sqrt(d.aspect) * out_w / w, d.scale / math.sqrt(d.aspect) * out_h / h
        src_h, src_w = h, w
        if min(sx, sy) < 1:  # shrink first with the antialiasing resize apply_draw uses; the rest stays zero
            src_h, src_w = max(1, round(h * min(sy, 1))), max(1, round(w * min(sx, 1)))
            import torchvision.transforms.v2.functional as TF

            shrunk = TF.resize(x[k].flatten(0, 1), [src_h, src_w], antialias=True)
            z[k].zero_()[:, :src_h, :src_w] = shrunk - fill[k].repeat(x.shape[1])[:, None, None]
        thetas.append(_padded_theta(_theta(d, out_w, out_h), (src_h, src_w), (h, w), (out_h, out_w), (big_h, big_w)))
    grid = affine_grid(torch.tensor(thetas, dtype=torch.float32), big_h, big_w)
    y = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = y.view(len(rows), -1, c, big_h, big_w) + fill[:, None, :, None, None]
    contrast = torch.tensor([draws[i].contrast for i in rows]).view(-1, 1, 1, 1, 1)
    brightness = torch.tensor([draws[i].brightness for i in rows]).view(-1, 1, 1, 1, 1)
    if (contrast != 1).any():  # the mean of each frame's canvas, not of its padding
        dims = torch.tensor(canvases).view(-1, 2, 1)
        valid_h = (torch.arange(big_h) < dims[:, 0]).float()  # (N, big_h)
        valid_w = (torch.arange(big_w) < dims[:, 1]).float()
        area = (dims[:, 0] * dims[:, 1] * c).view(-1, 1, 1, 1, 1)
        mean = torch.einsum("nlchw,nh,nw->nl", y, valid_h, valid_w)[:, :, None, None, None] / area
        y = (y - mean) * contrast + mean
    y = (y * brightness).clamp_(0, 1).flatten(1, 2)
    for i, r in zip(rows, _resize(y, canvases, size), strict=True):
        out[i] = r.view(*shape[:-2], *size)


def _resize(x: Tensor, sizes: list[tuple[int, int]], size: tuple[int, int]) -> Tensor:
    """Row ``k`` of ``x`` ``(N, C, H, W)`` (its top-left ``sizes[k]`` pixels) resized to ``size`` as
    ``TF.resize(antialias=True)`` does; a row already of that size passes untouched, as a preprocess that
    skips the resize leaves it."""
    if all(s == size for s in sizes) and x.shape[-2:] == size:
        return x
    if x.shape[-2] * x.shape[-1] > _MATRIX_PIXELS:
        import torchvision.transforms.v2.functional as TF

        return torch.stack(
            [
                r if s == size else TF.resize(r[:, : s[0], : s[1]], list(size), antialias=True)
                for r, s in zip(x, sizes, strict=True)
            ]
        )
    big_h, big_w = x.shape[-2:]
    rows = torch.stack([F.pad(resize_matrix(s[0], size[0]), (0, big_h - s[0])) for s in sizes])
    cols = torch.stack([F.pad(resize_matrix(s[1], size[1]), (0, big_w - s[1])) for s in sizes])
    return torch.einsum("nyh,nchw,nxw->ncyx", rows, x, cols)


@functools.lru_cache(maxsize=512)
def resize_matrix(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)``: the linear map of torch's antialiased bilinear resize along one axis (the identity when
    the sizes agree). Read off the kernel itself by resizing the identity, so it is that kernel's weights."""
    eye = torch.eye(n_in).view(1, n_in, 1, n_in)  # n_in one-row images, each a unit impulse
    return F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True, align_corners=False)[0, :, 0].T


def affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, [N, C, h, w], align_corners=False)`` as broadcast sums: torch's CPU kernel
    multiplies a materialised base grid, several times slower for the grids of a batch."""
    xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1)
    return torch.stack([t[:, r, 0] * xs + (t[:, r, 1] * ys[:, None] + t[:, r, 2]) for r in range(2)], dim=-1)


def _padded_theta(
    theta: list[list[float]],
    source: tuple[int, int],
    padded_source: tuple[int, int],
    canvas: tuple[int, int],
    padded_canvas: tuple[int, int],
) -> list[list[float]]:
    """``theta`` (normalised canvas -> normalised source) rewritten for a source and a canvas that sit in the
    top-left corners of larger padded ones: ``u' = D_in (u + 1) - 1`` and ``v = D_out (v' + 1) - 1``."""
    d_out = (padded_canvas[1] / canvas[1], padded_canvas[0] / canvas[0])  # (x, y)
    d_in = (source[1] / padded_source[1], source[0] / padded_source[0])
    rows = []
    for r in range(2):
        a0, a1, t = theta[r][0] * d_out[0], theta[r][1] * d_out[1], theta[r][2]
        shift = a0 + a1 - theta[r][0] - theta[r][1] + t  # A (D_out - I) 1 + t
        rows.append([d_in[r] * a0, d_in[r] * a1, d_in[r] * (shift + 1) - 1])
    return rows


def _border_colours(x: Tensor) -> Tensor:
    """:func:`border_colour` of each image of ``(N, frames, C, H, W)`` (over all its frames): ``(N, C)``."""
    edges = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (N, L, C, E)
    return edges.transpose(1, 2).flatten(2).median(dim=-1).values


def border_colour(x: Tensor) -> Tensor:
    """Per-channel median of the outermost pixels of ``(N, C, H, W)``: what fills the room a zoom-out leaves."""
    return _border_colours(x[None])[0]


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
        drawn = self.draw_clip(frames.shape[0], g)
        return frames if drawn is None else apply_draw(frames[drawn[0]], drawn[1])

    def draw_clip(self, total: int, g: torch.Generator) -> tuple[list[int], Draw] | None:
        """The frames a clip of ``total`` frames keeps (in order, repeats allowed) and their one spatial draw;
        ``None`` for a clip that passes as it is (``p`` gates the whole clip)."""
        if self.passes(g):
            return None
        length = max(1, round(total * _uniform(g, *self.keep))) if self.keep else total
        start = int(torch.randint(0, total - length + 1, (), generator=g))
        rate = math.exp(_uniform(g, *map(math.log, self.rate))) if self.rate else 1.0
        steps = max(1, round(length / rate))
        index = (start + np.minimum((np.arange(steps) * rate).astype(int), length - 1)).tolist()
        return index, self.draw(g, gate=False)

    def test_views(self, n: int) -> list[FixedView]:
        """Up to ``n`` fixed views: every frame, as it is, then the content centred at zooms spread over ``scale``."""
        return [FixedView(dataclasses.replace(PLAIN, scale=s), video=True) for s in view_factors(self.scale, n)]


def augments_as(augment: Any, kind: type) -> bool:
    """Whether ``augment`` makes of an item what ``kind``'s own ``augment_raw`` and ``augment_tensor`` make of it: a
    ``kind`` (or a subclass with other knobs or draws) that overrides neither. An encoder may then render a batch of
    such augmentations at once from their draws (``preprocess_many``); any other augmenter (a :class:`FixedView`, a
    plugin's, a :class:`VideoAugment` given to an image tower) goes item by item through its own two methods."""
    return isinstance(augment, kind) and all(
        getattr(type(augment), method) is getattr(kind, method) for method in ("augment_raw", "augment_tensor")
    )


def frames_as_float(frames: np.ndarray) -> Tensor:
    """Frames ``(T, H, W[, C])`` (uint8, or floats in [0, 1]) -> float ``(T, C, H, W)``, alpha dropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames if frames.ndim == 4 else frames[..., None]))
    x = x.permute(0, 3, 1, 2)[:, :3]
    return x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
