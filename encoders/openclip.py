"""OpenCLIP's towers (the ``open_clip_torch`` package): bind a new modality into an OpenCLIP image-text space.

``open_clip_image`` and ``open_clip_text`` build an OpenCLIP model by architecture name and weights, as
``open_clip.create_model_and_transforms`` does, and keep one tower of it:

- ``model="ViT-B-32", pretrained="laion2b_s34b_b79k"``: a tag from ``open_clip.list_pretrained()``; the weights
  come through Hugging Face's cache (``$HF_HOME``; ``$HF_HUB_OFFLINE=1`` is honoured). Offline and not cached, the
  error says which repository to download.
- ``pretrained="/path/to/weights.bin"``: a local checkpoint for that architecture.
- ``model="hf-hub:org/name"``: config and weights of a model published on the hub, through the same cache.
- ``path=DIR``: a folder with ``open_clip_config.json`` and weights (OpenCLIP's ``local-dir:``).
- ``random_init=True``: the architecture with random weights, on purpose. ``model=`` without ``pretrained=`` is
  refused otherwise: a recipe that forgot its weights would bind to a random "CLIP".

The tower's own preprocessing (OpenCLIP's evaluation transform, its tokenizer) turns raw items into inputs, and
``head="identity"`` (the default) keeps OpenCLIP's projection, so ``embed`` gives ``encode_image`` /
``encode_text`` after L2 normalisation. The extra installs the package:
``pip install -c constraints.txt -e '.[openclip]'``.

Example::

    image = create_encoder("open_clip_image", model="ViT-B-32", pretrained="laion2b_s34b_b79k").eval()
    image.embed(["dog.jpg"]).shape   # (1, 512)
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bind import ConfigError, DataError, FileArg, HeadKind, InputError, ModalityEncoder, find_blocks, register_encoder

from ._hf import HubFiles, hub_offline
from .image_augment import ImageAugment
from .image_io import IMAGE_SUFFIXES, example_images, load_rgb_pil

log = logging.getLogger(__name__)

EXTRA = "pip install -c constraints.txt -e '.[openclip]'"
# the arguments that name files: bindkit validate checks they exist, a saved model's config.json may name them only
# inside its folder (bind.FileArg); pretrained may also be a weights tag
FILES = {
    "pretrained": FileArg("expected a weights file of the architecture, or one of its tags", or_name=True),
    "path": FileArg("expected an OpenCLIP model folder (open_clip_config.json and weights)", folder=True),
}
PRETRAINED = "OpenCLIP (model= architecture, pretrained= tag or file; hf-hub: ids; path= local folder)"
DEFAULT_MODEL = "ViT-B-32"
WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def _did_you_mean(word: str, choices: list[str]) -> str:
    """``"did you mean 'ViT-B-32'? "`` for the choices closest to a mistyped ``word``, else ``""``."""
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(f"the open_clip_* encoders need the open_clip_torch package ({err}): {EXTRA}") from None
    return open_clip


def load_open_clip(
    model: str | None,
    pretrained: str | None,
    path: str | None,
    load_weights: bool,
    cache_dir: str | None,
    random_init: bool = False,
) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """``(clip model, evaluation transform, tokenizer, config)`` from OpenCLIP, or a one-line error saying what is wrong.

    ``config`` is what OpenCLIP's ``open_clip_config.json`` holds: the architecture and the preprocessing."""
    open_clip = import_open_clip()
    name, pretrained, hub = check_names(open_clip, model, pretrained, path, random_init, cache_dir)
    local_only = hub is not None and hub.local_only()  # not cached and no way to download: refused here, at once
    try:
        with hub_offline() if local_only else nullcontext():
            clip, _, transform = open_clip.create_model_and_transforms(
                name,
                pretrained=pretrained,
                load_weights=load_weights and not random_init,
                cache_dir=cache_dir,
                device="meta" if torch.empty(0).is_meta else "cpu",  # built on meta: sizes only (bind.budget)
            )
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except (RuntimeError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if hub is not None and not hub.cached():  # a repository without the files, a failed download
            raise DataError(f"{hub.refusal('it could not be downloaded')} ({first})") from None
        raise ConfigError(f"OpenCLIP could not build {name} (pretrained={pretrained!r}): {first}") from None
    config = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": open_clip.get_model_preprocess_cfg(clip)}
    return clip.eval(), transform, tokenizer, config


def check_names(
    open_clip: Any,
    model: str | None,
    pretrained: str | None,
    path: str | None,
    random_init: bool,
    cache_dir: str | None,
) -> tuple[str, str | None, HubFiles | None]:
    """``(OpenCLIP's model name, pretrained, the hub files it will fetch or None)``, or a one-line error that starts
    with the argument at fault: names OpenCLIP does not know, a missing folder or file, weights left out."""
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"path: {str(folder)!r} has no open_clip_config.json; expected an OpenCLIP model folder")
        if pretrained is not None:
            raise ConfigError("pretrained: pass it with model=, not with path= (the folder holds its own weights)")
        return f"local-dir:{folder}", None, None
    if model is None:
        raise ConfigError("model: open_clip encoders need model= (an OpenCLIP architecture, e.g. 'ViT-B-32') or path=")
    if pretrained is not None and random_init:
        raise ConfigError(f"random_init: pass pretrained={pretrained!r} or random_init=True, not both")
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:") :]
        weights = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        hub = HubFiles(repo, (("open_clip_config.json",), weights), f"model: OpenCLIP {model}", f"hf download {repo}",
                       "path= (an OpenCLIP model folder)", cache_dir)  # fmt: skip
        return model, pretrained, hub
    if model not in open_clip.list_models():
        raise ConfigError(
            f"model: {model!r} is not an OpenCLIP architecture; {_did_you_mean(model, open_clip.list_models())}"
            "open_clip.list_models() lists them"
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        if random_init:
            return model, None, None
        weights = (
            f"pretrained=TAG ({model}'s tags include {', '.join(tags[:3])}; "
            f"open_clip.list_pretrained_tags_by_model lists all {len(tags)}) or a weights file"
            if tags
            else f"pretrained=FILE (OpenCLIP has no released weights for {model})"
        )
        raise ConfigError(
            f"pretrained: not given, so OpenCLIP's {model} would start from random weights: pass {weights}, "
            "or random_init=True to train it from random weights on purpose"
        )
    file = Path(pretrained).expanduser()
    if file.is_file():
        return model, pretrained, None
    if pretrained not in tags:
        if os.sep in pretrained or "/" in pretrained or pretrained.endswith(WEIGHTS_SUFFIXES):
            raise DataError(f"pretrained: {pretrained} does not exist; expected {model}'s weights file or a tag of it")
        raise ConfigError(
            f"pretrained: {pretrained!r} is neither a file nor a weights tag of OpenCLIP's {model}; "
            f"its tags: {', '.join(tags) or 'none'}"
        )
    return model, pretrained, _tag_files(open_clip, model, pretrained, cache_dir)


def _tag_files(open_clip: Any, model: str, tag: str, cache_dir: str | None) -> HubFiles | None:
    """The hub file OpenCLIP downloads for a weights tag (its safetensors twin first, as open_clip tries it)."""
    repo, filename = os.path.split(open_clip.get_pretrained_cfg(model, tag).get("hf_hub") or "")
    if not repo:
        return None  # a tag with a URL only: open_clip downloads it outside Hugging Face's cache
    filename = filename or "open_clip_pytorch_model.bin"
    twin = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else None
    if twin is None and filename.endswith((".bin", ".pth")):
        twin = filename[:-4] + ".safetensors"
    return HubFiles(repo, (tuple(f for f in (twin, filename) if f),), f"pretrained: OpenCLIP {model} {tag}",
                    f"hf download {repo} {filename}", "pretrained=FILE", cache_dir)  # fmt: skip


def check_open_clip_args(args: Mapping[str, Any]) -> None:
    """``bindkit validate``: the package, the names, the files, and hub weights cached when offline."""
    try:
        open_clip = import_open_clip()
    except ConfigError as err:
        raise ConfigError(f"encoder: {err}") from None
    model, pretrained, path = args.get("model", DEFAULT_MODEL), args.get("pretrained"), args.get("path")
    try:
        _, _, hub = check_names(
            open_clip, model, pretrained, path, bool(args.get("random_init")), args.get("cache_dir")
        )
        if hub is not None:
            hub.check_offline()
    except (ConfigError, DataError) as err:
        raise type(err)(f"args.{err}") from None


def export_open_clip(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write the architecture (``open_clip_config.json``) to ``directory``; the kwargs that rebuild it from there."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return {"path": str(Path(directory.parent.name) / directory.name), "model": None, "pretrained": None,
            "load_weights": False}  # fmt: skip


def initial_logit_scale(clip: nn.Module) -> float:
    """The CLIP model's logit scale (at most 100); on the meta device, where no value exists, 100 (sizes only)."""
    return 100.0 if clip.logit_scale.is_meta else min(float(clip.logit_scale.detach().exp()), 100.0)


class OpenCLIPImageEncoder(ModalityEncoder):
    """OpenCLIP's image tower (``model.visual``, its projection included) and its evaluation transform."""

    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, clip: nn.Module, transform: Any, config: dict[str, Any], head: HeadKind, embed_dim: int | None):
        out_dim = config["model_cfg"]["embed_dim"]
        scale = initial_logit_scale(clip)
        super().__init__("image", clip.visual, out_dim, embed_dim or out_dim, head, scale, False)
        self.transform, self.open_clip_config = transform, config
        self.blocks = find_blocks(clip.visual)

    def preprocess(self, item: Any) -> Tensor:
        return self.transform(load_rgb_pil(item))

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_images(n, seed)

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_open_clip(directory, self.open_clip_config)


class TextTower(nn.Module):
    """The text half of an OpenCLIP model: ``encode_text``, with the image tower and the logit scale removed."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        clip.visual = None
        for attr in ("logit_scale", "logit_bias"):
            if isinstance(getattr(clip, attr, None), nn.Parameter):
                delattr(clip, attr)
        self.clip = clip

    def forward(self, tokens: Tensor) -> Tensor:
        return self.clip.encode_text(tokens)


class OpenCLIPTextEncoder(ModalityEncoder):
    """OpenCLIP's text tower (``encode_text``: transformer, pooling, projection) and its tokenizer."""

    takes_text = True

    def __init__(self, clip: nn.Module, tokenizer: Any, config: dict[str, Any], head: HeadKind, embed_dim: int | None):
        out_dim = config["model_cfg"]["embed_dim"]
        scale = initial_logit_scale(clip)
        super().__init__("text", TextTower(clip), out_dim, embed_dim or out_dim, head, scale, True)
        self.tokenizer, self.open_clip_config = tokenizer, config
        self.blocks = find_blocks(self.trunk)

    def preprocess(self, item: Any) -> Tensor:
        if not isinstance(item, str):
            raise InputError(f"OpenCLIP's text tower takes strings, got a {type(item).__name__}")
        return self.tokenizer([item])[0]

    def example_inputs(self, n: int, seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        return [f"a photo of {i} birds, number {int(rng.integers(100))}" for i in range(n)]

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_open_clip(directory, self.open_clip_config)


def _build(
    modality: str,
    model: str | None,
    pretrained: str | None,
    path: str | None,
    load_weights: bool,
    cache_dir: str | None,
    head: HeadKind,
    embed_dim: int | None,
    random_init: bool,
) -> ModalityEncoder:
    clip, transform, tokenizer, config = load_open_clip(model, pretrained, path, load_weights, cache_dir, random_init)
    if modality == "image":
        return OpenCLIPImageEncoder(clip, transform, config, head, embed_dim)
    return OpenCLIPTextEncoder(clip, tokenizer, config, head, embed_dim)


TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny OpenCLIP model in OpenCLIP's local-folder format (config + weights), unless one is there."""
    if (folder / "open_clip_config.json").is_file():
        return folder
    open_clip = import_open_clip()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}}  # fmt: skip
    tmp = folder / f".config.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.CLIP(**TINY_CONFIG)
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    os.replace(tmp, folder / "open_clip_config.json")  # the config last: a folder with it is complete
    return folder


def _tiny(scratch_dir: Path) -> dict[str, Any]:
    # a linear head: the contract trains the head of a frozen trunk (the default identity head has nothing to train)
    return {"path": str(save_tiny_open_clip(scratch_dir / "open_clip_tiny")), "head": "linear"}


@register_encoder(
    "image", pretrained=PRETRAINED, check_args=check_open_clip_args, tiny=_tiny, augmenter=ImageAugment, files=FILES
)
def open_clip_image(
    model: str | None = DEFAULT_MODEL,
    pretrained: str | None = None,
    path: str | None = None,
    load_weights: bool = True,
    cache_dir: str | None = None,
    head: HeadKind = "identity",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ModalityEncoder:
    """OpenCLIP's image tower (``encode_image``) with its evaluation transform; needs the openclip extra.

    ``random_init=True`` builds the architecture with random weights on purpose; without ``pretrained=`` (or
    ``path=``, an ``hf-hub:`` model) it is refused."""
    return _build("image", model, pretrained, path, load_weights, cache_dir, head, embed_dim, random_init)


@register_encoder("text", pretrained=PRETRAINED, check_args=check_open_clip_args, tiny=_tiny, files=FILES)
def open_clip_text(
    model: str | None = DEFAULT_MODEL,
    pretrained: str | None = None,
    path: str | None = None,
    load_weights: bool = True,
    cache_dir: str | None = None,
    head: HeadKind = "identity",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ModalityEncoder:
    """OpenCLIP's text tower (``encode_text``) with its tokenizer; needs the openclip extra.

    ``random_init=True`` builds the architecture with random weights on purpose; without ``pretrained=`` (or
    ``path=``, an ``hf-hub:`` model) it is refused."""
    return _build("text", model, pretrained, path, load_weights, cache_dir, head, embed_dim, random_init)
