"""A tower's sizes: read off the tensors of an ImageBind checkpoint (:func:`infer_config`), checked before anything
is built (:func:`check_config`), or imagebind_huge's (:func:`released_config`).

A config is a plain dict (a saved model's ``config.json`` holds it): ``modality`` (ImageBind's tower name),
``width``, ``depth``, ``heads``, ``out_dim``, the layout flags ``add_bias_kv`` and ``pre_norm``, and either
``vocab_size`` and ``context_length`` (text) or ``kernel``, ``stride`` and ``input_size`` (the others).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from torch import Tensor

from bind import ConfigError

from .keymaps import CHECKPOINT_URL, tower_keys

log = logging.getLogger(__name__)

# imagebind_huge: (width, depth, heads). Heads are in no tensor; these widths (and the constructor's defaults) say them.
RELEASED = {
    "vision": (1280, 32, 16),
    "text": (1024, 24, 16),
    "audio": (768, 12, 12),
    "depth": (384, 12, 8),
    "thermal": (768, 12, 12),
    "imu": (512, 6, 8),
}
KNOWN_HEADS = {1280: 16, 1024: 16, 768: 12, 512: 8, 384: 8}
IMU_CHANNELS = 6  # ImageBind's IMU stem: accelerometer then gyroscope, 3 axes each
VIDEO_FRAMES = 2  # ImageBind's vision stem: an image is repeated to 2 frames; a video clip is 2 frames


def _shape(state: dict[str, Tensor], key: str, ndim: int, where: str) -> tuple[int, ...]:
    if key not in state:
        raise ConfigError(f"{where} lacks {key!r}; expected an ImageBind tower in the format of {CHECKPOINT_URL}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConfigError(f"{where}: {key!r} has shape {shape}; expected {ndim} dimensions")
    return shape


def infer_config(
    state: dict[str, Tensor],
    modality: str,
    num_heads: int | None = None,
    n_mels: int = 128,
    target_length: int = 204,
    where: str = "checkpoint",
) -> dict[str, Any]:
    """One tower's sizes, read off its tensors (ImageBind keys). ``n_mels``/``target_length``: the audio input."""
    pre, head = f"modality_preprocessors.{modality}.", f"modality_heads.{modality}."
    tower_keys(state, modality, where)
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"modality_trunks\.{modality}\.blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ConfigError(f"{where}: the {modality} tower's blocks are missing or not numbered 0..N-1")
    width = _shape(state, f"modality_trunks.{modality}.blocks.0.norm_1.weight", 1, where)[0]
    projection = {"text": f"{head}proj.1.weight", "imu": f"{head}3.weight"}.get(modality, f"{head}2.weight")
    out_dim, proj_in = _shape(state, projection, 2, where)
    cfg: dict[str, Any] = {
        "modality": modality,
        "width": width,
        "depth": len(blocks),
        "heads": num_heads or _guess_heads(width, modality),
        "out_dim": out_dim,
        "add_bias_kv": f"modality_trunks.{modality}.blocks.0.attn.bias_k" in state,
        "pre_norm": f"modality_trunks.{modality}.pre_transformer_layer.0.weight" in state,
    }
    if proj_in != width:
        raise ConfigError(f"{where}: {projection!r} takes {proj_in} features but the {modality} trunk is {width} wide")
    if modality == "text":
        cfg["vocab_size"] = _shape(state, f"{pre}token_embedding.weight", 2, where)[0]
        cfg["context_length"] = _shape(state, f"{pre}pos_embed", 3, where)[1]
        return cfg
    pos = f"{pre}pos_embed" if modality == "imu" else f"{pre}pos_embedding_helper.pos_embed"
    patches = _shape(state, pos, 3, where)[1] - 1  # one CLS token
    if modality == "imu":
        in_features = _shape(state, f"{pre}imu_stem.proj.weight", 2, where)[1]
        if in_features % IMU_CHANNELS:
            raise ConfigError(f"{where}: the IMU stem takes {in_features} values, not a multiple of 6 channels")
        kernel = in_features // IMU_CHANNELS
        return {**cfg, "kernel": [kernel], "stride": [kernel], "input_size": [patches * kernel]}
    stem = {"vision": "rgbt_stem.proj.1", "depth": "depth_stem.proj"}.get(modality, "rgbt_stem.proj")
    weight = _shape(state, f"{pre}{stem}.weight", 5 if modality == "vision" else 4, where)
    kernel = list(weight[2:])
    if modality == "audio":
        stride = _audio_stride(kernel[-1], patches, n_mels, target_length, where)
        return {**cfg, "kernel": kernel, "stride": [stride, stride], "input_size": [n_mels, target_length]}
    frames = VIDEO_FRAMES // kernel[0] if modality == "vision" else 1
    side = math.isqrt(patches // max(frames, 1))
    if modality == "vision" and VIDEO_FRAMES % kernel[0]:
        raise ConfigError(f"{where}: the vision stem's temporal kernel {kernel[0]} does not divide 2 frames")
    if frames * side * side != patches or side == 0:
        raise ConfigError(f"{where}: the {modality} tower has {patches} patch positions, not a square grid")
    return {**cfg, "kernel": kernel, "stride": kernel, "input_size": [side * kernel[-2], side * kernel[-1]]}


def _guess_heads(width: int, modality: str) -> int:
    if width in KNOWN_HEADS:
        return KNOWN_HEADS[width]
    if width % 64:
        raise ConfigError(
            f"the ImageBind {modality} tower is {width} wide; its number of attention heads is stored in no tensor "
            "and cannot be guessed for that width: pass num_heads=N"
        )
    log.warning(
        "ImageBind %s tower of width %d: assuming %d attention heads (pass num_heads=)", modality, width, width // 64
    )
    return width // 64


def _audio_stride(kernel: int, patches: int, n_mels: int, target_length: int, where: str) -> int:
    for stride in range(1, kernel + 1):
        if ((n_mels - kernel) // stride + 1) * ((target_length - kernel) // stride + 1) == patches:
            return stride
    raise ConfigError(
        f"{where}: no stride of the {kernel}-bin audio stem gives {patches} patches on a {n_mels} x {target_length} "
        "spectrogram; pass the n_mels and target_length the model was trained with"
    )


LIMITS = {"width": 16384, "depth": 256, "heads": 512, "out_dim": 16384, "vocab_size": 1_000_000, "context_length": 4096}
SIZE_KEYS = {"kernel": 1024, "stride": 1024, "input_size": 1_000_000}
NEEDED = {"text": ("vocab_size", "context_length")}


def check_config(cfg: Any) -> None:
    """A tower's sizes (from a checkpoint, a recipe or a saved run's config.json) are sane before anything is built."""
    if not isinstance(cfg, dict) or cfg.get("modality") not in RELEASED:
        raise ConfigError(
            f"ImageBind config: expected a mapping with modality one of {', '.join(RELEASED)}, got {cfg!r:.200}"
        )
    m = cfg["modality"]
    keys = ("width", "depth", "heads", "out_dim", *NEEDED.get(m, ("kernel", "stride", "input_size")))
    for key in keys:
        value = cfg.get(key)
        values = value if key in SIZE_KEYS and isinstance(value, list) else [value]
        limit = SIZE_KEYS.get(key) or LIMITS[key]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in values):
            raise ConfigError(
                f"ImageBind {m} config: {key} must be a whole number (or list of them) in 1..{limit}, got {value!r}"
            )
    if cfg["width"] % cfg["heads"]:
        raise ConfigError(f"ImageBind {m} config: heads={cfg['heads']} does not divide width={cfg['width']}")
    for flag in ("add_bias_kv", "pre_norm"):
        if not isinstance(cfg.get(flag), bool):
            raise ConfigError(f"ImageBind {m} config: {flag} must be true or false, got {cfg.get(flag)!r}")


def tower_config(modality: str, width: int, depth: int, heads: int, out_dim: int, **sizes: Any) -> dict[str, Any]:
    """A tower's config as :func:`infer_config` reads one off a checkpoint; the layout flags are ImageBind's."""
    layout = {"add_bias_kv": modality not in ("vision", "text"), "pre_norm": modality == "vision"}
    return {"modality": modality, "width": width, "depth": depth, "heads": heads, "out_dim": out_dim, **layout, **sizes}


RELEASED_SIZES = {
    "vision": {"kernel": [2, 14, 14], "stride": [2, 14, 14], "input_size": [224, 224]},
    "text": {"vocab_size": 49408, "context_length": 77},
    "audio": {"kernel": [16, 16], "stride": [10, 10], "input_size": [128, 204]},
    "depth": {"kernel": [16, 16], "stride": [16, 16], "input_size": [224, 224]},
    "thermal": {"kernel": [16, 16], "stride": [16, 16], "input_size": [224, 224]},
    "imu": {"kernel": [8], "stride": [8], "input_size": [2000]},
}


def released_config(modality: str) -> dict[str, Any]:
    """imagebind_huge's sizes (random weights): a tower to train from scratch, or to load a saved model into."""
    return tower_config(modality, *RELEASED[modality], out_dim=1024, **RELEASED_SIZES[modality])
