"""The registered ImageBind encoders: one factory per tower, all made from one table (:data:`TOWERS`).

Every factory takes the same six arguments (``checkpoint``, ``config``, ``num_heads``, ``head``, ``embed_dim``,
``random_init``), then its tower's own (a row's ``extra``), and builds through :func:`build`. A factory is a
plain function with that signature, name and docstring, so ``inspect.signature``, ``typing.get_type_hints``,
``help()`` and the registry's argument checks see it as they see a hand-written one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bind import ConfigError, FileArg, register_encoder

from ..clip_bpe import VOCAB_FILE, VOCAB_URL, find_bpe_vocab
from ..image_augment import ImageAugment, VideoAugment
from .checkpoint_shapes import check_config, infer_config, released_config
from .encoder import ImageBindEncoder
from .keymaps import CHECKPOINT_URL
from .tiny import save_tiny_checkpoint

PRETRAINED = f"ImageBind checkpoint (checkpoint=PATH; {CHECKPOINT_URL})"
# the arguments that name files: bindkit validate checks they exist, a saved model's config.json may name them only
# inside its folder (bind.FileArg)
FILES = {"checkpoint": FileArg(f"download {CHECKPOINT_URL}")}


def check_weights(modality: str, checkpoint: Any, config: Any, random_init: bool) -> None:
    """The weights a tower starts from are said outright: ``checkpoint=``, ``config=`` (a saved model's tower,
    whose weights load next) or ``random_init=True``; a one-line :class:`ConfigError` naming the argument else."""
    if checkpoint is not None and (config is not None or random_init):
        other = "config=" if config is not None else "random_init=True"
        raise ConfigError(f"checkpoint: pass either checkpoint= (sizes read off its tensors) or {other}, not both")
    if checkpoint is None and config is None and not random_init:
        raise ConfigError(
            f"checkpoint: not given, so ImageBind's {modality} tower would start from random weights: pass "
            f"checkpoint=PATH (imagebind_huge.pth, from {CHECKPOINT_URL}) or random_init=True to train "
            "imagebind_huge's architecture from random weights on purpose"
        )


def args_check(modality: str) -> Callable[[Mapping[str, Any]], None]:
    """``bindkit validate``'s check of a tower's arguments (files are checked through ``FILES``)."""

    def check(args: Mapping[str, Any]) -> None:
        try:
            check_weights(modality, args.get("checkpoint"), args.get("config"), bool(args.get("random_init")))
        except ConfigError as err:
            raise ConfigError(f"args.{err}") from None
        if modality == "text" and args.get("bpe_path") is None:  # CLIP's vocabulary, from an installed package
            try:
                find_bpe_vocab()
            except ConfigError as err:
                raise ConfigError(f"args.bpe_path: {err}") from None

    return check


def build(
    modality: str,
    checkpoint: str | None,
    config: dict[str, Any] | None,
    num_heads: int | None,
    head: str,
    embed_dim: int | None,
    random_init: bool,
    video: bool = False,
    **kwargs: Any,
) -> ImageBindEncoder:
    """One tower of ImageBind's ``modality`` (its name for it: ``"vision"``, ``"text"``, ...): sizes read off
    ``checkpoint`` and its weights loaded, or the sizes of ``config`` (or imagebind_huge's) with random weights.
    ``kwargs``: the tower's own arguments (``clips``, ``n_mels``, ``target_length``, ``bpe_path``)."""
    check_weights(modality, checkpoint, config, random_init)
    state, where = None, None
    if checkpoint is not None:
        where = f"ImageBind checkpoint {str(checkpoint)!r}"
        # looked up on the package when called: encoders.imagebind.read_checkpoint is the one name to wrap or patch
        state = importlib.import_module(__package__).read_checkpoint(checkpoint)
        audio = {k: kwargs[k] for k in ("n_mels", "target_length") if kwargs.get(k)}
        config = infer_config(state, modality, num_heads, where=where, **audio)
    elif config is None:
        config = released_config(modality)
    check_config(config)
    config = {**config, "heads": num_heads or config["heads"]}
    encoder = ImageBindEncoder(config, head, embed_dim, kwargs.get("bpe_path"), kwargs.get("clips"), video)
    if state is not None and not encoder.log_logit_scale.is_meta:  # on the meta device (bind.budget) sizes only
        encoder.load_imagebind(state, where)
    return encoder


def tiny_args(scratch_dir: Path) -> dict[str, Any]:
    """The tiny variant of every tower (``EncoderInfo.tiny``): the tiny checkpoint, saved under ``scratch_dir``."""
    return {"checkpoint": str(save_tiny_checkpoint(scratch_dir / "imagebind_tiny.pth")), "num_heads": 2}


# ---- the table -----------------------------------------------------------------------------------------------------
# An argument: (name, annotation as source code would write it, default).
Arg = tuple[str, str, Any]

COMMON_ARGS: tuple[Arg, ...] = (
    ("checkpoint", "str | None", None),
    ("config", "dict[str, Any] | None", None),
    ("num_heads", "int | None", None),
    ("head", "str", "imagebind"),
    ("embed_dim", "int | None", None),
    ("random_init", "bool", False),
)


@dataclass(frozen=True)
class Tower:
    """One registered factory: its name, the modality it registers for, the ImageBind tower it builds."""

    name: str
    modality: str  # bindkit's modality, that the encoder is registered for
    tower: str  # ImageBind's tower: "vision", "text", "audio", "depth", "thermal" or "imu"
    doc: str  # the factory's docstring; its first line is `bindkit encoders`' description
    extra: tuple[Arg, ...] = ()  # the arguments after COMMON_ARGS, passed to build() by name
    augmenter: type | None = None  # what a recipe's train_data.augment configures
    files: Mapping[str, FileArg] = field(default_factory=dict)  # files to read besides checkpoint
    video: bool = False  # the vision tower run on videos


TOWERS: tuple[Tower, ...] = (
    Tower(
        "imagebind_image",
        "image",
        "vision",
        "ImageBind's vision tower (ViT-H/14 in the release) on images: 224 px, CLIP's normalisation.",
        augmenter=ImageAugment,
    ),
    Tower(
        "imagebind_video",
        "video",
        "vision",
        "ImageBind's vision tower on videos: five 2 s clips of two frames, three crops each, averaged.",
        extra=(("clips", "int", 5),),
        augmenter=VideoAugment,
        video=True,
    ),
    Tower(
        "imagebind_text",
        "text",
        "text",
        "ImageBind's text tower (OpenCLIP ViT-H's): CLIP BPE, 77 tokens, causal attention, end-token pooling.",
        extra=(("bpe_path", "str | None", None),),
        files={"bpe_path": FileArg(f"expected CLIP's {VOCAB_FILE} (from {VOCAB_URL})")},
    ),
    Tower(
        "imagebind_audio",
        "audio",
        "audio",
        "ImageBind's audio tower: 16 kHz, three 2 s clips, 128-bin Kaldi fbank of 204 frames, averaged.",
        extra=(("clips", "int", 3), ("n_mels", "int", 128), ("target_length", "int", 204)),
    ),
    Tower(
        "imagebind_depth",
        "depth",
        "depth",
        "ImageBind's depth tower: depth in metres as disparity in [0, 1], 224 px.",
    ),
    Tower(
        "imagebind_thermal",
        "thermal",
        "thermal",
        "ImageBind's thermal tower: one channel min-max scaled to [0, 1], 224 px.",
    ),
    Tower(
        "imagebind_imu",
        "imu",
        "imu",
        "ImageBind's IMU tower: 6 channels (accelerometer, gyroscope) of 2,000 samples at 200 Hz.",
    ),
)


def make_factory(tower: Tower) -> Callable[..., ImageBindEncoder]:
    """The factory function of one row: ``tower.name(checkpoint=None, ..., random_init=False, *extra)``."""
    signature = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
            for name, annotation, default in (*COMMON_ARGS, *tower.extra)
        ],
        return_annotation="ImageBindEncoder",
    )

    def factory(*args: Any, **kwargs: Any) -> ImageBindEncoder:
        bound = signature.bind(*args, **kwargs)  # a TypeError for arguments the signature does not take
        bound.apply_defaults()
        return build(tower.tower, video=tower.video, **bound.arguments)

    factory.__name__ = factory.__qualname__ = tower.name
    factory.__module__ = __package__  # where it is imported from: encoders.imagebind (a saved model records it)
    factory.__doc__ = tower.doc
    factory.__signature__ = signature  # type: ignore[attr-defined]
    factory.__annotations__ = {name: p.annotation for name, p in signature.parameters.items()}
    factory.__annotations__["return"] = signature.return_annotation
    return factory


def register(tower: Tower) -> Callable[..., ImageBindEncoder]:
    """Make one row's factory and register it as ``tower.name`` for ``tower.modality``."""
    return register_encoder(
        tower.modality,
        name=tower.name,
        pretrained=PRETRAINED,
        tiny=tiny_args,
        augmenter=tower.augmenter,
        files={**FILES, **tower.files},
        check_args=args_check(tower.tower),
    )(make_factory(tower))


FACTORIES = {tower.name: register(tower) for tower in TOWERS}

imagebind_image = FACTORIES["imagebind_image"]
imagebind_video = FACTORIES["imagebind_video"]
imagebind_text = FACTORIES["imagebind_text"]
imagebind_audio = FACTORIES["imagebind_audio"]
imagebind_depth = FACTORIES["imagebind_depth"]
imagebind_thermal = FACTORIES["imagebind_thermal"]
imagebind_imu = FACTORIES["imagebind_imu"]
