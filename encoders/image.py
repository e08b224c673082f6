"""Image encoders: a small CNN for 28x28 digits, torchvision backbones and Hugging Face CLIP vision.

Every image encoder's ``preprocess`` starts with :func:`~encoders.image_io.load_image` (a file, PIL image, array or
tensor -> float (C, H, W) in [0, 1]), then resizes and normalises for its trunk. Video encoders
reuse an image encoder's ``preprocess`` frame by frame.

Example::

    enc = create_encoder("tv_resnet18", weights="IMAGENET1K_V1", embed_dim=512)  # via torch.hub's cache
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
from torch import Tensor, nn

from bind import ConfigError, DataError, HeadKind, ModalityEncoder, register_encoder

from ._hf import TINY_TRANSFORMER, HFEncoder, hf_path_check, load_hf_model, load_hf_processor, save_tiny_hf
from ._vision import VIT_TINY, Trunk, cnn_trunk, vit_trunk
from .image_augment import PLAIN, Draw, ImageAugment, augments_as, render
from .image_io import IMAGE_SUFFIXES, LUMA, example_images, load_image

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class ImageEncoder(ModalityEncoder):
    """A trunk on (B, C, H, W) images; ``preprocess`` loads, resizes, centre-crops and normalises.

    Args:
        trunk: the trunk, the size of its features and its blocks (what :meth:`trunk_blocks` returns).
        embed_dim: size of the embedding; ``None`` keeps the trunk's feature size.
        channels: 1 (grayscale) or 3 (RGB) input channels of the trunk.
        image_size: side of the square images the trunk takes.
        mean, std: per-channel normalisation.
        crop_fraction: ``None`` resizes straight to ``image_size`` (digits: keep the whole glyph);
            otherwise the shorter side is resized to ``image_size / crop_fraction`` and centre-cropped,
            as torchvision's ImageNet evaluation does.
    """

    file_suffixes = IMAGE_SUFFIXES

    def __init__(
        self,
        trunk: Trunk,
        embed_dim: int | None,
        *,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_fraction: float | None = 0.875,
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
    ) -> None:
        super().__init__(
            "image", trunk.module, trunk.dim, embed_dim or trunk.dim, head, logit_scale, learnable_logit_scale
        )
        if image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
        self.channels, self.image_size, self.crop_fraction = channels, image_size, crop_fraction
        self.mean, self.std = list(mean), list(std)
        self.blocks = trunk.blocks  # a plain list: the modules stay registered once, under trunk

    def preprocess(self, item: Any) -> Tensor:
        """Raw image -> (channels, image_size, image_size), normalised."""
        import torchvision.transforms.v2.functional as TF

        image = load_image(item, self.channels)
        size = self.image_size
        if self.crop_fraction is None:
            if image.shape[-2:] != (size, size):
                image = TF.resize(image, [size, size], antialias=True)
        else:
            image = TF.center_crop(TF.resize(image, round(size / self.crop_fraction), antialias=True), [size, size])
        return TF.normalize(image, self.mean, self.std)

    def preprocess_many(
        self, items: Sequence[Any], augment: Any = None, generators: Sequence[torch.Generator] | None = None
    ) -> list[Any]:
        """A batch of images rendered together (:func:`~encoders.image_augment.render`): the same values as
        preprocessing (and augmenting) them one by one, a fraction of the time in a DataLoader worker."""
        if not self.renders_batches or (augment is not None and not augments_as(augment, ImageAugment)):
            return super().preprocess_many(items, augment, generators)
        images = [load_image(item, channels=None) for item in items]
        draws = [augment.draw(g) for g in generators] if augment is not None else [PLAIN] * len(images)
        return self.preprocess_drawn(images, draws)

    @property
    def renders_batches(self) -> bool:
        """Whether :meth:`preprocess_drawn` applies: ``preprocess`` resizes straight to the trunk's size (no crop)."""
        return self.crop_fraction is None

    def preprocess_drawn(
        self, images: Sequence[Tensor], draws: Sequence[Draw], fills: Sequence[Tensor | None] | None = None
    ) -> list[Tensor]:
        """``preprocess(apply_draw(x, draw))`` for float images ``(..., C, H, W)`` in [0, 1], batched (the frames a
        video uses come as one image, with their clip's border colour); only where :attr:`renders_batches`."""
        import torchvision.transforms.v2.functional as TF

        out = []
        for x in render(images, draws, (self.image_size, self.image_size), fills):
            if self.channels == 1 and x.shape[-3] == 3:
                x = torch.einsum("...chw,c->...hw", x, torch.tensor(LUMA)).unsqueeze(-3)
            elif self.channels == 3 and x.shape[-3] == 1:
                x = x.expand(*x.shape[:-3], 3, -1, -1)
            out.append(x)
        if len({x.shape for x in out}) == 1:
            return list(TF.normalize(torch.stack(out), self.mean, self.std).unbind())
        return [TF.normalize(x, self.mean, self.std) for x in out]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_images(n, seed)

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)


@register_encoder("image", augmenter=ImageAugment, pretrained="none", tiny={"width": 4, "embed_dim": 16})
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
    trunk = cnn_trunk(width)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return ImageEncoder(
        trunk, embed_dim, channels=1, image_size=28, mean=MNIST_MEAN, std=MNIST_STD, crop_fraction=None, **head_args
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
            "pass weights= (a torchvision weights name such as IMAGENET1K_V1, fetched through torch.hub's cache) instead"
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
        return {"weights_path": None, "weights": None}


def torchvision_weights(builder: str, name: str) -> Path:
    """The file of torchvision's weights ``name`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ...) for model ``builder``.

    It is looked up in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps it, and
    downloaded there when missing, unless ``$HF_HUB_OFFLINE=1`` (bindkit's one offline switch). Offline and not
    cached, or when the download fails, a one-line :class:`DataError` says which URL to put where.
    """
    from urllib.parse import urlparse

    import torchvision
    from huggingface_hub import constants

    enum = torchvision.models.get_model_weights(builder)
    if name not in enum.__members__:
        raise ConfigError(
            f"weights: {name!r} is not one of torchvision's {enum.__name__}: {', '.join(enum.__members__)}"
        )
    url = enum[name].url
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if file.is_file():
        return file
    if constants.HF_HUB_OFFLINE:
        raise DataError(
            f"weights: torchvision's {enum.__name__}.{name} is not in torch.hub's cache and this process is offline "
            f"($HF_HUB_OFFLINE=1): download {url} to {file} on a machine with network access, or pass weights_path="
        )
    try:
        torch.hub.download_url_to_file(url, str(file), progress=False)  # a temporary file, renamed when complete
    except OSError as err:  # URLError, HTTPError, timeouts
        raise DataError(
            f"weights: could not download torchvision's {enum.__name__}.{name} ({err}): download {url} to {file} "
            "yourself, or pass weights_path="
        ) from None
    return file


def _weights_file(builder: str, weights_path: str | None, weights: str | None) -> str | None:
    if weights is not None and weights_path is not None:
        raise ConfigError("pass weights= (a torchvision weights name) or weights_path= (a local file), not both")
    return str(torchvision_weights(builder, weights)) if weights is not None else weights_path


def _torchvision_encoder(trunk: Trunk, head_attr: str, weights_path: str | None, **kwargs: Any) -> ImageEncoder:
    """An RGB, ImageNet-normalised encoder on a torchvision ``trunk`` whose classification head ``head_attr``
    is already Identity (so it returns pooled features); a local checkpoint at ``weights_path`` is loaded first.
    """
    if weights_path is not None:
        load_checkpoint(trunk.module, weights_path, skip_prefixes=(f"{head_attr}.",))
    return TorchvisionEncoder(trunk, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs)


_TV_PRETRAINED = "torchvision ImageNet weights (weights= name through torch.hub's cache, or weights_path= file)"
_TV_FILES = {"weights_path": "pass a state-dict file of the model, or weights= (a torchvision weights name)"}


def tv_resnet(arch: str, trunk_dim: int, weights_path: str | None, **kwargs: Any) -> ImageEncoder:
    """torchvision's ResNet ``arch`` (``resnet18``, ``resnet50``, ...) as an encoder: ``trunk_dim``-d pooled
    features, its four stages as blocks. A new ResNet variant is a factory that calls this."""
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    trunk = Trunk(model, trunk_dim, [model.layer1, model.layer2, model.layer3, model.layer4])
    return _torchvision_encoder(trunk, "fc", weights_path, **kwargs)


_RESNET_TINY = {"image_size": 32, "embed_dim": 16}


@register_encoder("image", augmenter=ImageAugment, pretrained=_TV_PRETRAINED, tiny=_RESNET_TINY, files=_TV_FILES)
def tv_resnet18(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    weights: str | None = None,
    image_size: int = 224,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """ResNet-18 (torchvision), optionally pretrained; 512-d pooled features.

    ``weights="IMAGENET1K_V1"`` takes torchvision's weights through torch.hub's cache (:func:`torchvision_weights`),
    ``weights_path=`` a local checkpoint. ``embed_dim=None`` keeps the feature size. Example::

        enc = create_encoder("tv_resnet18", weights="IMAGENET1K_V1", embed_dim=256)
    """
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    file = _weights_file("resnet18", weights_path, weights)
    return tv_resnet("resnet18", 512, file, embed_dim=embed_dim, image_size=image_size, **head_args)


@register_encoder("image", augmenter=ImageAugment, pretrained=_TV_PRETRAINED, tiny=_RESNET_TINY, files=_TV_FILES)
def tv_resnet50(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    weights: str | None = None,
    image_size: int = 224,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> ImageEncoder:
    """ResNet-50 (torchvision), optionally pretrained (``weights=`` name or ``weights_path=``); 2048-d features."""
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    file = _weights_file("resnet50", weights_path, weights)
    return tv_resnet("resnet50", 2048, file, embed_dim=embed_dim, image_size=image_size, **head_args)


@register_encoder(
    "image", augmenter=ImageAugment, pretrained=_TV_PRETRAINED, tiny={**VIT_TINY, "embed_dim": 16}, files=_TV_FILES
)
def tv_vit_b_16(
    embed_dim: int | None = None,
    weights_path: str | None = None,
    weights: str | None = None,
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
    """ViT-B/16 (torchvision), optionally pretrained (``weights=`` name or ``weights_path=``); class-token features.

    The architecture arguments default to ViT-B/16; ImageNet checkpoints need them and image_size=224.
    """
    weights_path = _weights_file("vit_b_16", weights_path, weights)
    trunk = vit_trunk("tv_vit_b_16", image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
    head_args = {"head": head, "logit_scale": logit_scale, "learnable_logit_scale": learnable_logit_scale}
    return _torchvision_encoder(trunk, "heads", weights_path, embed_dim=embed_dim, image_size=image_size, **head_args)


class HFCLIPVisionEncoder(HFEncoder):
    """Hugging Face ``CLIPVisionModelWithProjection``; features are its projected ``image_embeds``."""

    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, model: nn.Module, processor: Any, embed_dim: int | None, **kwargs: Any) -> None:
        trunk_dim = model.config.projection_dim
        super().__init__("image", model, processor, trunk_dim, embed_dim or trunk_dim, **kwargs)

    def preprocess(self, item: Any) -> Tensor:
        """Raw image -> (3, H, W) pixel values, resized, cropped and normalised by the CLIP processor."""
        image = load_image(item, 3)
        return self.processor(images=image, do_rescale=False, return_tensors="pt")["pixel_values"][0]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_images(n, seed)

    def forward_features(self, batch: Tensor) -> Tensor:
        return self.trunk(pixel_values=batch).image_embeds


def _tiny_clip_vision(scratch_dir: Path) -> dict[str, Any]:
    """Save a tiny random CLIP vision tower and its processor under ``scratch_dir`` (for tests)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(image_size=32, patch_size=16, projection_dim=16, **TINY_TRANSFORMER)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = save_tiny_hf(Path(scratch_dir) / "clip_vision", CLIPVisionModelWithProjection, config, processor)
    return {"path": path, "embed_dim": 16}


@register_encoder(
    "image",
    augmenter=ImageAugment,
    pretrained="Hugging Face CLIP hub id or local directory (path)",
    tiny=_tiny_clip_vision,
    check_args=hf_path_check("hf_clip_vision"),
)
def hf_clip_vision(
    path: str,
    load_weights: bool = True,
    embed_dim: int | None = None,
    head: HeadKind = "linear",
    logit_scale: float = 1 / 0.07,
    learnable_logit_scale: bool = True,
) -> HFCLIPVisionEncoder:
    """CLIP vision tower + image processor from a Hugging Face hub id or local directory; projection_dim features.

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
