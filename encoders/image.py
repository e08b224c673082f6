"""Image encoders: a small CNN for 28x28 digits, torchvision backbones and Hugging Face CLIP vision.

Every image encoder's ``preprocess`` starts with :func:`load_image` (a file, PIL image, array or
tensor -> float (C, H, W) in [0, 1]), then resizes and normalises for its trunk. Video encoders
reuse an image encoder's ``preprocess`` frame by frame.

Example::

    enc = create_encoder("tv_resnet18", weights_path="resnet18-f37072fd.pth", embed_dim=512)
    z = enc.embed(["cat.jpg", np.zeros((64, 64, 3), np.uint8)])  # (2, 512), unit norm
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from bind import ModalityEncoder, register_encoder
from bind.encoder import HeadKind, find_blocks
from bind.errors import ConfigError, DataError, InputError

from ._hf import export_hf, load_hf_model, load_hf_processor

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights PIL's convert("L") uses


# Pixels an image may have before it is decoded (a 12000 x 12000 PNG of a few kilobytes decodes to 432 MB of RGB,
# for an encoder that looks at 224 x 224). $BINDKIT_MAX_IMAGE_PIXELS overrides it; PIL's own bomb check (about
# 179 megapixels) stays in force above it.
MAX_IMAGE_PIXELS = 50_000_000


def max_image_pixels() -> int:
    """The pixel budget: ``$BINDKIT_MAX_IMAGE_PIXELS`` when set, else :data:`MAX_IMAGE_PIXELS`."""
    value = os.environ.get("BINDKIT_MAX_IMAGE_PIXELS")
    if value is None:
        return MAX_IMAGE_PIXELS
    try:
        budget = int(value)
    except ValueError:
        budget = 0
    if budget < 1:
        raise ConfigError(f"$BINDKIT_MAX_IMAGE_PIXELS: expected a positive number of pixels, got {value!r}")
    return budget


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


def example_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random 28 x 28 uint8 grayscale images: what every image encoder's ``example_inputs`` gives."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]


def load_image(item: Any, channels: int = 3) -> Tensor:
    """One raw image -> float tensor (channels, H, W) in [0, 1], on the CPU.

    ``item`` is a file path (any format PIL reads: PNG, JPEG, ...), a PIL image, a numpy array
    (H, W) or (H, W, C), or a tensor (C, H, W) or (H, W), with C in 1, 3, 4 (alpha is dropped).
    uint8 values are divided by 255, uint16 (arrays, 16-bit PNG) by 65535; floats must lie in [0, 1].

    Example::

        load_image("digit.png", channels=1).shape  # torch.Size([1, 28, 28])
    """
    if channels not in (1, 3):
        raise ConfigError(f"load_image: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if isinstance(item, (str, os.PathLike)):
        image = _from_array(_read_file(Path(item)), f"image file {str(item)!r}")
    elif isinstance(item, Image.Image):
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
        image = _scale_to_unit(image, where)
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


def _read_file(path: Path) -> np.ndarray:
    where = f"image file {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where} does not exist; expected a PNG/JPEG (or other PIL-readable) file")
    if path.stat().st_size == 0:
        raise InputError(f"{where} is empty (0 bytes); expected a PNG or JPEG file: re-export or re-download it")
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
            check_image_size(img.size, where)
            return _pil_to_array(ImageOps.exif_transpose(img))  # phones store rotation in EXIF, not pixels
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
    return _scale_to_unit(torch.from_numpy(array).permute(2, 0, 1), where)


def _scale_to_unit(image: Tensor, where: str) -> Tensor:
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


class ImageEncoder(ModalityEncoder):
    """A trunk on (B, C, H, W) images; ``preprocess`` loads, resizes, centre-crops and normalises.

    Args:
        channels: 1 (grayscale) or 3 (RGB) input channels of the trunk.
        image_size: side of the square images the trunk takes.
        mean, std: per-channel normalisation.
        crop_fraction: ``None`` resizes straight to ``image_size`` (digits: keep the whole glyph);
            otherwise the shorter side is resized to ``image_size / crop_fraction`` and centre-cropped,
            as torchvision's ImageNet evaluation does.
        block_names: submodule names (under this encoder) returned by :meth:`trunk_blocks`.
    """

    file_suffixes = IMAGE_SUFFIXES

    def __init__(
        self,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int | None,
        *,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_fraction: float | None = 0.875,
        block_names: Sequence[str] = (),
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
    ) -> None:
        super().__init__(
            "image",
            trunk,
            trunk_dim,
            embed_dim or trunk_dim,
            head=head,
            logit_scale=logit_scale,
            learnable_logit_scale=learnable_logit_scale,
        )
        if image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
        self.channels, self.image_size, self.crop_fraction = channels, image_size, crop_fraction
        self.mean, self.std = list(mean), list(std)
        self.block_names = list(block_names)

    def preprocess(self, item: Any) -> Tensor:
        """Raw image -> (channels, image_size, image_size), normalised."""
        image = load_image(item, self.channels)
        size = self.image_size
        if self.crop_fraction is None:
            if image.shape[-2:] != (size, size):
                image = TF.resize(image, [size, size], antialias=True)
        else:
            image = TF.center_crop(TF.resize(image, round(size / self.crop_fraction), antialias=True), [size, size])
        return TF.normalize(image, self.mean, self.std)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_images(n, seed)

    def trunk_blocks(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in self.block_names]


def _conv_block(c_in: int, c_out: int, convs: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register_encoder("image", pretrained="none", tiny={"width": 4, "embed_dim": 16})
def digits_cnn(
    embed_dim: int = 128,
    width: int = 32,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """Small CNN for 28x28 grayscale digits (MNIST-style), trained from scratch; 4*width-d features.

    Three conv-BN-ReLU blocks (28 -> 14 -> 7 pixels) and a global average pool.

    Example::

        enc = create_encoder("digits_cnn", embed_dim=64, width=16)
    """
    trunk = nn.Sequential(
        _conv_block(1, width, 2, pool=True),
        _conv_block(width, 2 * width, 2, pool=True),
        _conv_block(2 * width, 4 * width, 1, pool=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return ImageEncoder(
        trunk,
        4 * width,
        embed_dim,
        channels=1,
        image_size=28,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        crop_fraction=None,
        block_names=["trunk.0", "trunk.1", "trunk.2"],
        **head_args,
    )


def load_checkpoint(model: nn.Module, weights_path: str | os.PathLike[str], skip_prefixes: tuple[str, ...]) -> None:
    """Load a local state dict (.pth/.pt via ``torch.load(weights_only=True)``, or .safetensors) into ``model``.

    Keys starting with ``skip_prefixes`` (the replaced classification head) are ignored; any other
    missing, unexpected or mis-shaped key is a :class:`DataError` naming the file.
    """
    path = Path(weights_path).expanduser()
    what = f"weights_path {str(path)!r}"
    if not path.is_file():
        raise DataError(
            f"{what} does not exist; expected a local torchvision checkpoint (.pth, .pt or .safetensors). "
            "bindkit never downloads weights: fetch the file once (URLs are in torchvision's model docs) and pass its path"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors share no base class
        raise DataError(
            f"{what} could not be read ({type(err).__name__}: {err}); expected a state dict saved with "
            "torch.save(model.state_dict(), ...) or safetensors"
        ) from err
    for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{what} does not hold a state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(skip_prefixes)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise DataError(f"{what} does not fit the {type(model).__name__} architecture: {err}") from err
    if missing or unexpected:
        raise DataError(
            f"{what} does not fit the {type(model).__name__} architecture: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; pass the checkpoint of the same torchvision model (and image_size)"
        )
    log.info("loaded %s from %s", type(model).__name__, path)


class TorchvisionEncoder(ImageEncoder):
    """A torchvision backbone; its weights travel in the saved model, so a reload needs no checkpoint."""

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return {"weights_path": None}


def _torchvision_encoder(
    model: nn.Module, head_attr: str, trunk_dim: int, block_names: list[str], weights_path: str | None, **kwargs: Any
) -> ImageEncoder:
    # The classification head becomes Identity, so the trunk returns its pooled features.
    setattr(model, head_attr, nn.Identity())
    if weights_path is not None:
        load_checkpoint(model, weights_path, skip_prefixes=(f"{head_attr}.",))
    return TorchvisionEncoder(
        model, trunk_dim, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, block_names=block_names, **kwargs
    )


def _resnet(arch: str, trunk_dim: int, weights_path: str | None, **kwargs: Any) -> ImageEncoder:
    blocks = [f"trunk.layer{i}" for i in range(1, 5)]
    return _torchvision_encoder(
        getattr(torchvision.models, arch)(weights=None), "fc", trunk_dim, blocks, weights_path, **kwargs
    )


_TV_PRETRAINED = "local torchvision ImageNet checkpoint (weights_path)"
_VIT_TINY = {"image_size": 32, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


@register_encoder("image", pretrained=_TV_PRETRAINED, tiny={"image_size": 32, "embed_dim": 16})
def tv_resnet18(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    image_size: int = 224,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """ResNet-18 (torchvision), optionally from a local checkpoint; 512-d pooled features.

    ``embed_dim=None`` keeps the feature size. Example::

        enc = create_encoder("tv_resnet18", weights_path="~/weights/resnet18-f37072fd.pth", embed_dim=256)
    """
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return _resnet("resnet18", 512, weights_path, embed_dim=embed_dim, image_size=image_size, **head_args)


@register_encoder("image", pretrained=_TV_PRETRAINED, tiny={"image_size": 32, "embed_dim": 16})
def tv_resnet50(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    image_size: int = 224,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """ResNet-50 (torchvision), optionally from a local checkpoint; 2048-d pooled features."""
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return _resnet("resnet50", 2048, weights_path, embed_dim=embed_dim, image_size=image_size, **head_args)


@register_encoder("image", pretrained=_TV_PRETRAINED, tiny={**_VIT_TINY, "embed_dim": 16})
def tv_vit_b_16(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    image_size: int = 224,
    patch_size: int = 16,
    num_layers: int = 12,
    num_heads: int = 12,
    hidden_dim: int = 768,
    mlp_dim: int = 3072,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """ViT-B/16 (torchvision), optionally from a local checkpoint; class-token features (hidden_dim).

    The architecture arguments default to ViT-B/16; ImageNet checkpoints need them and image_size=224.
    """
    if image_size % patch_size:
        raise ConfigError(f"tv_vit_b_16: image_size={image_size} must be a multiple of patch_size={patch_size}")
    model = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    blocks = [f"trunk.encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return _torchvision_encoder(
        model, "heads", hidden_dim, blocks, weights_path, embed_dim=embed_dim, image_size=image_size, **head_args
    )


class HFCLIPVisionEncoder(ModalityEncoder):
    """Hugging Face ``CLIPVisionModelWithProjection``; features are its projected ``image_embeds``."""

    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, model: nn.Module, processor: Any, embed_dim: int | None, **kwargs: Any) -> None:
        trunk_dim = model.config.projection_dim
        super().__init__("image", model, trunk_dim, embed_dim or trunk_dim, **kwargs)
        self.processor = processor

    def preprocess(self, item: Any) -> Tensor:
        """Raw image -> (3, H, W) pixel values, resized, cropped and normalised by the CLIP processor."""
        image = load_image(item, 3)
        return self.processor(images=image, do_rescale=False, return_tensors="pt")["pixel_values"][0]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_images(n, seed)

    def forward_features(self, batch: Tensor) -> Tensor:
        return self.trunk(pixel_values=batch).image_embeds

    def trunk_blocks(self) -> list[nn.Module]:
        return find_blocks(self.trunk)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.processor)


def _tiny_clip_vision(scratch_dir: Path) -> dict[str, Any]:
    """Save a tiny random CLIP vision tower and its processor under ``scratch_dir`` (for tests)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(scratch_dir) / "clip_vision"
    if not (path / "config.json").is_file():
        config = CLIPVisionConfig(
            image_size=32,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=16,
        )
        CLIPVisionModelWithProjection(config).save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return {"path": str(path), "embed_dim": 16}


@register_encoder("image", pretrained="local Hugging Face CLIP directory (path)", tiny=_tiny_clip_vision)
def hf_clip_vision(
    path: str,
    load_weights: bool = True,
    embed_dim: int | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> HFCLIPVisionEncoder:
    """CLIP vision tower + image processor from a local Hugging Face directory; projection_dim features.

    Example::

        enc = create_encoder("hf_clip_vision", path="~/models/clip-vit-base-patch32", head="identity")
    """
    # Imported here so that listing encoders does not pay for importing transformers' model code.
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = load_hf_model(CLIPVisionModelWithProjection, path, load_weights, what="hf_clip_vision")
    processor = load_hf_processor(CLIPImageProcessor, path, what="hf_clip_vision")
    return HFCLIPVisionEncoder(
        model, processor, embed_dim, head=head, logit_scale=logit_scale, learnable_logit_scale=learnable_logit_scale
    )
