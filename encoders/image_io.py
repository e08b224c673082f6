"""Reading images for the image encoders: files, shard bytes, PIL images, arrays, tensors -> float (C, H, W) in [0, 1].

:func:`load_image` is where every image encoder's ``preprocess`` starts (video encoders reach it frame by frame).
A file is checked against a pixel budget (:func:`max_image_pixels`) from its header, before any pixel is decoded,
and turned upright by its EXIF orientation. Importing this module registers :func:`decode_image_bytes`, the shard
decoder for :data:`IMAGE_SUFFIXES`.

Example::

    load_image("digit.png", channels=1).shape  # torch.Size([1, 28, 28])
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from bind import ConfigError, InputError, positive_env, register_decoder

if TYPE_CHECKING:
    from PIL import Image

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights PIL's convert("L") uses


# Pixels an image may have before it is decoded (a 12000 x 12000 PNG of a few kilobytes decodes to 432 MB of RGB,
# for an encoder that looks at 224 x 224). $BINDKIT_MAX_IMAGE_PIXELS overrides it; PIL's own bomb check (about
# 179 megapixels) stays in force above it.
MAX_IMAGE_PIXELS = 50_000_000


def max_image_pixels() -> int:
    """The pixel budget: ``$BINDKIT_MAX_IMAGE_PIXELS`` when set (a positive whole number), else
    :data:`MAX_IMAGE_PIXELS`."""
    return positive_env("BINDKIT_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS, "pixels")


def check_image_size(size: tuple[int, int], where: str) -> None:
    """Raise :class:`InputError` when a ``(width, height)`` image is over the pixel budget; call before decoding."""
    width, height = size
    budget = max_image_pixels()
    if width * height > budget:
        raise InputError(
            f"{where} is {width} x {height} = {width * height:,} pixels, over the budget of {budget:,}; "
            "expected a smaller image: downscale it, or raise $BINDKIT_MAX_IMAGE_PIXELS if you trust the file"
        )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")


@register_decoder(*(suffix[1:] for suffix in IMAGE_SUFFIXES))
def decode_image_bytes(data: bytes, where: str) -> Image.Image:
    """A shard member's image bytes -> an upright PIL image, as :func:`load_image` reads a file (same pixel budget)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: the size is checked before decoding
            check_image_size(image.size, f"image {where}")
            return ImageOps.exif_transpose(image)  # a loaded copy
    except Image.DecompressionBombError as err:  # PIL's own limit, when the budget is raised past it
        raise ValueError(str(err)) from None


def _is_pil_image(item: Any) -> bool:
    """Whether ``item`` is a PIL image, without importing PIL: a PIL image exists only once PIL.Image is loaded."""
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(item, pil.Image)


def example_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random 28 x 28 uint8 grayscale images: what every image encoder's ``example_inputs`` gives."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]


def load_image(item: Any, channels: int | None = 3, upright: bool = True) -> Tensor:
    """One raw image -> float tensor (channels, H, W) in [0, 1], on the CPU (``channels=None``: its own, 1 or 3).

    ``item`` is a file path (any format PIL reads: PNG, JPEG, ...), a PIL image, a numpy array
    (H, W) or (H, W, C), or a tensor (C, H, W) or (H, W), with C in 1, 3, 4 (alpha is dropped).
    uint8 values are divided by 255, uint16 (arrays, 16-bit PNG) by 65535; floats must lie in [0, 1].
    A file is turned upright by its EXIF orientation unless ``upright=False`` (the stored pixels, as a tower
    whose reference code ignores EXIF reads them).

    Example::

        load_image("digit.png", channels=1).shape  # torch.Size([1, 28, 28])
    """
    if channels not in (1, 3, None):
        raise ConfigError(f"load_image: channels must be 1 (grayscale), 3 (RGB) or None (as stored), got {channels}")
    if isinstance(item, (str, os.PathLike)):
        image = _from_array(_read_file(Path(item), upright), f"image file {str(item)!r}")
    elif _is_pil_image(item):
        where = f"PIL image of mode {item.mode}"
        check_image_size(item.size, where)  # an Image.open()ed image is not decoded yet
        image = _from_array(_pil_to_array(item), where)
    elif isinstance(item, np.ndarray):
        image = _from_array(item, f"image array of shape {item.shape}")
    elif isinstance(item, Tensor):
        where = f"image tensor of shape {tuple(item.shape)}"
        image = item.detach().cpu()
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise InputError(f"{where}: expected (C, H, W) with C in 1, 3, 4, or (H, W)")
        image = scale_to_unit(image, where)
    else:
        raise InputError(
            f"cannot read an image from {type(item).__name__}; expected a file path, a PIL image, "
            "a numpy array (H, W) or (H, W, C), or a tensor (C, H, W) or (H, W)"
        )
    if image.shape[0] == 4:
        image = image[:3]
    if channels == 1 and image.shape[0] == 3:
        image = torch.einsum("chw,c->hw", image, torch.tensor(LUMA)).unsqueeze(0)
    elif channels == 3 and image.shape[0] == 1:
        image = image.repeat(3, 1, 1)
    return image.contiguous()


def load_rgb_pil(item: Any) -> Image.Image:
    """One raw image as an RGB PIL image of its stored pixels (no EXIF turn), as reference code that opens files
    with PIL and ``convert("RGB")`` sees them (ImageBind's, OpenCLIP's transforms); [0, 1] floats back to 8 bits."""
    if _is_pil_image(item):
        return item.convert("RGB")
    from PIL import Image

    unit = load_image(item, channels=3, upright=False)
    return Image.fromarray(unit.mul(255).round().byte().permute(1, 2, 0).numpy())


def _read_file(path: Path, upright: bool = True) -> np.ndarray:
    where = f"image file {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where} does not exist; expected a PNG/JPEG (or other PIL-readable) file")
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise InputError(f"{where} is empty (0 bytes); expected a PNG or JPEG file: re-export or re-download it")
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
            check_image_size(img.size, where)
            return _pil_to_array(ImageOps.exif_transpose(img) if upright else img)  # phones store rotation in EXIF
    except (ConfigError, InputError):  # the pixel budget's own clear line (ValueErrors, caught below otherwise)
        raise
    except Image.DecompressionBombError as err:  # PIL's own limit, when the budget is raised past it
        raise InputError(
            f"{where} is too large to decode safely ({err}); expected a smaller image: downscale it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(
            f"{where} is empty, corrupt or not an image PIL can read ({type(err).__name__}: {err}); "
            "expected a PNG or JPEG file"
        ) from err


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I"):  # 16-bit PNGs open as "I;16" or "I"; convert("L") would clip them
        return np.asarray(img, dtype=np.float32) / 65535
    if img.mode not in ("L", "RGB", "RGBA"):  # palette (indices, not colours), CMYK, LA, 1-bit, ...
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    return np.array(img)


def _from_array(array: np.ndarray, where: str) -> Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"{where}: expected (H, W) or (H, W, C) with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535
    # torch.from_numpy warns on read-only arrays (np.asarray of a PIL image, np.frombuffer): copy those
    array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
    return scale_to_unit(torch.from_numpy(array).permute(2, 0, 1), where)


def scale_to_unit(image: Tensor, where: str) -> Tensor:
    """Pixels of any shape ``(..., H, W)`` -> float in [0, 1]: uint8 / 255, bools, floats checked finite and in
    [0, 1] (an :class:`InputError` naming ``where`` otherwise)."""
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise InputError(f"{where} is empty; expected at least one pixel")
    if image.dtype == torch.uint8:
        return image.float() / 255
    if image.dtype == torch.bool:
        return image.float()
    if not image.dtype.is_floating_point:
        raise InputError(f"{where} has dtype {image.dtype}; expected uint8 (0-255), uint16 or float in [0, 1]")
    image = image.float()
    if not torch.isfinite(image).all():
        raise InputError(f"{where} holds NaN or inf values; expected finite values in [0, 1]")
    low, high = image.min().item(), image.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise InputError(
            f"{where} has float values in [{low:.4g}, {high:.4g}]; expected [0, 1]: divide 0-255 data by 255 "
            "or pass it as uint8"
        )
    return image.clamp(0, 1)
