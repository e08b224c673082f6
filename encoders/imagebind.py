"""ImageBind's towers, loaded from its released checkpoint: bind a new modality into ImageBind's space.

``imagebind_image``, ``imagebind_text``, ``imagebind_audio``, ``imagebind_depth``, ``imagebind_thermal``,
``imagebind_imu`` and ``imagebind_video`` each take ``checkpoint=PATH``: a state-dict file in the format of
ImageBind's ``imagebind_huge.pth`` (keys under ``modality_preprocessors.``, ``modality_trunks.``,
``modality_heads.``, ``modality_postprocessors.``), read with ``torch.load(weights_only=True, mmap=True)`` so that
one tower of the 4.5 GB file is all that reaches memory. Widths, depths, patch kernels, strides, input sizes and
the output size are read off the tensors (:func:`infer_config`), so a smaller model saved in the same format
loads too. The number of attention heads is not stored in any tensor: it is the released model's for the
released widths, ``width // 64`` otherwise, or ``num_heads=``.

Each tower applies ImageBind's own preprocessing (``imagebind/data.py``) to raw items, and its head (LayerNorm,
the CLS token or the text's end token, a bias-free projection), so that :meth:`~bind.ModalityEncoder.embed` gives
ImageBind's embeddings after L2 normalisation:

- image: RGB (the stored pixels: ImageBind ignores EXIF), resize the short side to 224 (PIL bicubic), centre crop,
  CLIP's mean and std; the vision stem sees it as a 2-frame video (the frame repeated);
- text: CLIP's BPE tokenizer (:mod:`encoders.clip_bpe`), 77 tokens, causal attention, the end token pooled;
- audio: 16 kHz, three 2 s clips evenly spaced over the file (pytorchvideo's ``ConstantClipsPerVideoSampler``),
  each made zero-mean (in place on the shared waveform, as ImageBind does), Kaldi fbank of the first channel
  (128 bins, 25 ms Hann windows every 10 ms), cut or zero-padded to 204 frames, ``(x + 4.268) / 9.138``;
- video: five 2 s clips, each its first and last frame, short side scaled to 224 (bilinear), CLIP's mean and std,
  three crops along the long side: 15 two-frame clips through the vision tower;
- depth, thermal, IMU: ImageBind's repository ships no loader for them. bindkit's: depth in metres -> disparity
  in [0, 1] (:func:`encoders.depth.depth_to_unit`, missing pixels 0), thermal min-max scaled to [0, 1], both
  resized (short side) and centre-cropped to the tower's size; IMU ``(6, T)`` at 200 Hz (accelerometer then
  gyroscope), centre-cropped or zero-padded to the tower's 2,000 samples.

The clip embeddings of one item are averaged as ImageBind averages them (its scaled unit vectors; the direction is
the same). ImageBind's weights are licensed by Meta (CC-BY-NC 4.0) and never shipped with bindkit: download
https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth yourself. Without ``checkpoint=`` a tower is refused,
so that a recipe that forgot it does not bind to a random "ImageBind": ``random_init=True`` builds imagebind_huge's
architecture with random weights on purpose, and ``config=`` (how a saved model rebuilds a tower before its own
weights load) gives the sizes.

Example::

    image = create_encoder("imagebind_image", checkpoint="imagebind_huge.pth").eval()
    image.embed(["dog.jpg"]).shape   # (1, 1024)
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from bind import ModalityEncoder, register_encoder
from bind.encoder import ClipBatch, build_head
from bind.errors import ConfigError, InputError
from bind.registry import FileArg

from .audio_io import AUDIO_SUFFIXES, load_audio
from .clip_bpe import VOCAB_FILE, VOCAB_URL, CLIPTokenizer, find_bpe_vocab
from .depth import depth_to_unit, load_depth
from .image_augment import ImageAugment, VideoAugment
from .image_io import IMAGE_SUFFIXES, example_images, load_rgb_pil
from .imu import load_imu
from .thermal import load_thermal, thermal_to_unit
from .video_io import VIDEO_SUFFIXES, example_videos, load_frames, read_video_with_rate

log = logging.getLogger(__name__)

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
# ImageBind's names of its modalities, and bindkit's modality for each tower
MODALITY = {"vision": "image", "text": "text", "audio": "audio", "depth": "depth", "thermal": "thermal", "imu": "imu"}
PREFIXES = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
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
DROP_PATH = {"audio": 0.1, "imu": 0.7}  # ImageBind's stochastic depth when a tower trains (progressive over blocks)
# the logit scales of ImageBind's postprocessors: (initial value, learnable); vision has none (it is the anchor)
LOGIT_SCALE = {
    "text": (1 / 0.07, True),
    "audio": (20.0, False),
    "depth": (5.0, False),
    "thermal": (10.0, False),
    "imu": (5.0, False),
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
AUDIO_RATE, AUDIO_MEAN, AUDIO_STD = 16000, -4.268, 9.138
IMU_CHANNELS, IMU_RATE = 6, 200
VIDEO_FRAMES = 2  # ImageBind's vision stem: an image is repeated to 2 frames; a video clip is 2 frames


# ---- the checkpoint format ----------------------------------------------------------------------------------------
def key_map(modality: str) -> list[tuple[str, str | None]]:
    """``(ImageBind key prefix, bindkit key prefix)`` pairs of one tower; ``None``: a buffer rebuilt, not loaded."""
    pre, trunk, head, post = (f"{p}.{modality}." for p in PREFIXES)
    pairs: list[tuple[str, str | None]] = [(f"{trunk}blocks.", "trunk.blocks.")]
    if modality == "text":
        return [
            *pairs,
            (f"{pre}token_embedding.", "trunk.token_embedding."),
            (f"{pre}pos_embed", "trunk.pos_embed"),
            (f"{pre}mask", None),
            (f"{head}proj.0.", "trunk.norm."),
            (f"{head}proj.1.", "head."),
            (f"{post}1.log_logit_scale", "log_logit_scale"),
        ]
    pairs += [(f"{pre}cls_token", "trunk.cls_token"), (f"{head}0.", "trunk.norm.")]
    if modality == "vision":
        return [
            *pairs,
            (f"{pre}pos_embedding_helper.pos_embed", "trunk.pos_embed"),
            (f"{pre}rgbt_stem.proj.1.", "trunk.patch_embed."),
            (f"{trunk}pre_transformer_layer.0.", "trunk.norm_pre."),
            (f"{head}2.", "head."),
        ]
    if modality == "imu":
        stem, projection, pos = f"{pre}imu_stem.", (f"{head}3.", "head.1."), f"{pre}pos_embed"
    else:
        stem = f"{pre}{'depth_stem' if modality == 'depth' else 'rgbt_stem'}."
        projection, pos = (f"{head}2.", "head."), f"{pre}pos_embedding_helper.pos_embed"
    return [
        *pairs,
        (pos, "trunk.pos_embed"),
        (f"{stem}proj.", "trunk.patch_embed."),
        (f"{stem}norm_layer.", "trunk.patch_norm."),
        projection,
        (f"{post}1.log_logit_scale", "log_logit_scale"),
    ]


def _rename(key: str, pairs: list[tuple[str, str | None]], reverse: bool = False) -> tuple[bool, str | None]:
    for theirs, ours in pairs:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if src is not None and key.startswith(src):
            return True, None if dst is None else dst + key[len(src) :]
    return False, None


def from_imagebind(state: dict[str, Tensor], modality: str, where: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of one ImageBind tower, renamed to bindkit's keys (``trunk.``, ``head.``, ``log_logit_scale``)."""
    pairs, out = key_map(modality), {}
    for key in tower_keys(state, modality, where):
        known, ours = _rename(key, pairs)
        if not known:
            raise ConfigError(f"{where}: key {key!r} is not part of ImageBind's {modality} tower as bindkit knows it")
        if ours is not None:
            out[ours] = state[key]
    return out


def tower_keys(state: dict[str, Tensor], modality: str, where: str = "checkpoint") -> list[str]:
    """The keys of one tower in an ImageBind-format state dict; a one-line error naming the towers there if none."""
    mine = [k for k in state if any(k.startswith(f"{p}.{modality}.") for p in PREFIXES)]
    if not mine:
        present = sorted({k.split(".")[1] for k in state if k.split(".")[0] in PREFIXES and k.count(".") > 1})
        raise ConfigError(
            f"{where} has no ImageBind {modality} tower: expected keys under modality_trunks.{modality}. "
            f"(the format of {CHECKPOINT_URL}); it has towers: {', '.join(present) or 'none'}"
        )
    return mine


def to_imagebind(state: dict[str, Tensor], modality: str) -> dict[str, Tensor]:
    """The inverse of :func:`from_imagebind`: a bindkit ImageBind tower's weights under ImageBind's keys."""
    out = {}
    for key, value in state.items():
        known, theirs = _rename(key, key_map(modality), reverse=True)
        if known and theirs is not None:
            out[theirs] = value
    if modality == "text":
        context = out["modality_preprocessors.text.pos_embed"].shape[1]
        out["modality_preprocessors.text.mask"] = causal_mask(context)
    return out


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """An ImageBind state-dict file, memory-mapped where possible; a clear one-line error for anything else."""
    p = Path(path).expanduser()
    where = f"ImageBind checkpoint {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where} does not exist; download {CHECKPOINT_URL} (4.5 GB) and pass its path")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # an old (non-zip) serialization cannot be memory-mapped: read it whole
        if "mmap" not in str(err):
            raise ConfigError(f"{where} is not a PyTorch state-dict file ({str(err).splitlines()[0][:200]})") from None
        state = _load_whole(p, where)
    except Exception as err:  # pickles with code (refused by weights_only), truncated or foreign files
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(
            f"{where} is not a plain PyTorch state dict that loads with weights_only=True ({first}); "
            f"expected the format of {CHECKPOINT_URL}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{where} holds a {type(state).__name__}, not a state dict of tensors (ImageBind's format)")
    return state


def _load_whole(p: Path, where: str) -> dict[str, Tensor]:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(
            f"{where} is not a plain PyTorch state dict that loads with weights_only=True ({first})"
        ) from None


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


def causal_mask(length: int) -> Tensor:
    """Additive causal attention mask: position i sees positions <= i."""
    return torch.full((length, length), float("-inf")).triu_(1)


# ---- the towers --------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: while training, drop a sample's residual branch with probability ``p`` (rescaling the rest)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ImageBind's pre-norm block: LayerNorm (eps 1e-6), attention (optionally with learned key/value biases), MLP."""

    def __init__(self, width: int, heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"num_heads={heads} does not divide the tower's width {width}")
        self.attn = nn.MultiheadAttention(width, heads, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1, self.norm_2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.mlp, self.drop_path = Mlp(width), DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class ImageBindTrunk(nn.Module):
    """Stem, CLS token and position embedding, transformer, final LayerNorm and pooling of one ImageBind tower.

    Input: images ``(B, 3, H, W)`` or two-frame clips ``(B, 3, 2, H, W)`` (vision), token ids ``(B, L)`` (text),
    spectrograms or maps ``(B, 1, H, W)`` (audio, depth, thermal), ``(B, 6, T)`` (IMU). Output ``(B, width)``.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        m, width = cfg["modality"], cfg["width"]
        self.modality = m
        if m == "text":
            self.token_embedding = nn.Embedding(cfg["vocab_size"], width)
            self.pos_embed = nn.Parameter(torch.randn(1, cfg["context_length"], width) * 0.01)
            self.register_buffer("mask", causal_mask(cfg["context_length"]), persistent=False)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
        else:
            kernel, stride = cfg["kernel"], cfg["stride"]
            if m == "vision":
                self.patch_embed = nn.Conv3d(3, width, kernel, stride=stride, bias=False)
            elif m == "imu":
                self.patch_embed = nn.Linear(IMU_CHANNELS * kernel[0], width, bias=False)
            else:
                self.patch_embed = nn.Conv2d(1, width, kernel, stride=stride, bias=False)
            self.patch_norm = nn.LayerNorm(width) if m != "vision" else None
            self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches() + 1, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width, eps=1e-6) if cfg["pre_norm"] else None
        top, depth = DROP_PATH.get(m, 0.0), cfg["depth"]
        rates = [top * i / max(depth - 1, 1) for i in range(depth)]  # progressive, as ImageBind's linspace
        self.blocks = nn.ModuleList(Block(width, cfg["heads"], cfg["add_bias_kv"], p) for p in rates)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):  # ImageBind's ("jax") initialisation, for towers trained from scratch
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def num_patches(self) -> int:
        cfg = self.cfg
        if self.modality == "imu":
            return cfg["input_size"][0] // cfg["kernel"][0]
        sizes = [VIDEO_FRAMES, *cfg["input_size"]] if self.modality == "vision" else cfg["input_size"]
        return math.prod((n - k) // s + 1 for n, k, s in zip(sizes, cfg["kernel"], cfg["stride"], strict=True))

    def tokens(self, x: Tensor) -> Tensor:
        if self.modality == "text":
            return self.token_embedding(x) + self.pos_embed
        if self.modality == "vision":
            x = x.unsqueeze(2) if x.ndim == 4 else x
            x = x.repeat(1, 1, VIDEO_FRAMES, 1, 1) if x.shape[2] == 1 else x  # an image is a 2-frame video
        if self.modality == "imu":
            k = self.cfg["kernel"][0]
            x = x.unfold(-1, k, k).permute(0, 2, 1, 3).flatten(2)  # (B, T / k, 6 * k): channels x time per patch
            x = self.patch_embed(x)
        else:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise InputError(
                f"ImageBind {self.modality} input gives {x.shape[1] - 1} patches; the tower has position "
                f"embeddings for {self.pos_embed.shape[1] - 1} (input size {self.cfg['input_size']})"
            )
        return x + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x)
        if self.norm_pre is not None:
            h = self.norm_pre(h)
        mask = self.mask if self.modality == "text" else None
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        if self.modality == "text":  # the end token has the largest id: CLIP's pooling
            return h[torch.arange(h.shape[0], device=h.device), x.argmax(dim=-1)]
        return h[:, 0]


# ---- preprocessing -----------------------------------------------------------------------------------------------
def image_pixels(item: Any, size: int) -> Tensor:
    """ImageBind's image transform: RGB, short side to ``size`` (bicubic), centre crop, CLIP's mean and std."""
    image = load_rgb_pil(item)  # a file's stored pixels: ImageBind ignores EXIF
    image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), size)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def clip_times(duration: float, clip_duration: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo's ``ConstantClipsPerVideoSampler``: ``clips`` windows evenly spaced over ``duration`` seconds."""
    length = Fraction(clip_duration)
    last_start = Fraction(max(duration - length, 0))
    step = Fraction(last_start, max(clips - 1, 1))
    times = []
    for i in range(clips):
        times.append((step * i, step * i + length))
        if step * (i + 1) > last_start:
            break
    return times


def load_waveform(item: Any) -> Tensor:
    """``(channels, samples)`` float32 at 16 kHz: a file (all channels: ImageBind's fbank takes the first),
    ``(wave, rate)`` or an array at 16 kHz."""
    return load_audio(item, AUDIO_RATE, mono=False)


def audio_clips(wave: Tensor, n_mels: int = 128, target_length: int = 204, clips: int = 3) -> Tensor:
    """ImageBind's audio transform of a ``(channels, samples)`` 16 kHz waveform -> ``(clips, 1, n_mels, target_length)``."""
    wave = wave.clone()  # each clip is made zero-mean in place, on the shared waveform, as ImageBind's loader does
    out = []
    for start, end in clip_times(wave.shape[1] / AUDIO_RATE, 2, clips):
        clip = wave[:, int(start * AUDIO_RATE) : int(end * AUDIO_RATE)]
        if clip.shape[1] < 400:
            raise InputError(
                f"audio of {wave.shape[1]} samples at 16 kHz is shorter than one 25 ms frame (400 samples)"
            )
        clip -= clip.mean()
        fbank = kaldi.fbank(
            clip,
            htk_compat=True,
            sample_frequency=AUDIO_RATE,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=n_mels,
            dither=0.0,
            frame_length=25,
            frame_shift=10,
        ).T  # (n_mels, frames) of the first channel
        fbank = F.pad(fbank, (0, target_length - fbank.shape[1])) if fbank.shape[1] < target_length else fbank
        out.append(((fbank[:, :target_length] - AUDIO_MEAN) / AUDIO_STD)[None])
    while len(out) < clips:  # a sampler that stops early (it does not for 3 clips): repeat the last
        out.append(out[-1])
    return torch.stack(out)


def video_clips(frames: np.ndarray, fps: float, size: int, clips: int = 5) -> Tensor:
    """ImageBind's video transform: ``(T, H, W, 3)`` uint8 at ``fps`` -> ``(clips * 3, 3, 2, size, size)``."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"video of shape {frames.shape}: expected (T, H, W, 3) RGB frames, at least one")
    total, out = frames.shape[0], []
    for start, end in clip_times(total / fps, 2, clips):
        # the frames of [start, end), as pytorchvideo's decord reader indexes them; a clip past the end keeps the last
        first, stop = math.ceil(fps * start), min(math.ceil(fps * end), total)
        inside = np.arange(first, stop) if first < stop else np.array([min(first, total - 1)])
        picked = inside[torch.linspace(0, len(inside) - 1, VIDEO_FRAMES).long().numpy()]  # first and last frame
        clip = torch.from_numpy(frames[picked]).permute(3, 0, 1, 2).float() / 255  # (3, 2, H, W)
        h, w = clip.shape[-2:]
        new = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
        clip = F.interpolate(clip, size=new, mode="bilinear", align_corners=False)
        clip = (clip - torch.tensor(CLIP_MEAN)[:, None, None, None]) / torch.tensor(CLIP_STD)[:, None, None, None]
        out.extend(_three_crops(clip, size))
    return torch.stack(out)


def _three_crops(clip: Tensor, size: int) -> list[Tensor]:
    """Left, centre, right (or top, centre, bottom) ``size`` squares along the long side."""
    h, w = clip.shape[-2:]
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    crops = []
    for index in range(3):
        yi, xi = y, x
        if h > w:
            yi = {0: 0, 1: y, 2: h - size}[index]
        else:
            xi = {0: 0, 1: x, 2: w - size}[index]
        crops.append(clip[..., yi : yi + size, xi : xi + size])
    return crops


# ---- the encoder -------------------------------------------------------------------------------------------------
FILE_SUFFIXES = {
    "vision": IMAGE_SUFFIXES,
    "audio": AUDIO_SUFFIXES,
    "depth": (".npy", *IMAGE_SUFFIXES),
    "thermal": (".npy", *IMAGE_SUFFIXES),
    "imu": (".npy", ".csv"),
}


class ImageBindEncoder(ModalityEncoder):
    """One ImageBind tower: its preprocessing, trunk and projection (``head="imagebind"``), or a new head.

    ``video=True`` runs the vision tower on videos (modality ``"video"``). ``clips``: audio or video clips per item.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        head: str = "imagebind",
        embed_dim: int | None = None,
        bpe_path: str | None = None,
        clips: int | None = None,
        video: bool = False,
    ) -> None:
        trunk = ImageBindTrunk(cfg)  # checks the config first
        m = cfg["modality"]
        if head == "imagebind" and embed_dim not in (None, cfg["out_dim"]):
            raise ConfigError(
                f"head='imagebind' keeps ImageBind's {cfg['out_dim']}-d projection, so embed_dim must be "
                f"{cfg['out_dim']} (or left out), got {embed_dim}; pick head='linear' to project to another size"
            )
        if clips is not None and not (isinstance(clips, int) and 1 <= clips <= 64):
            raise ConfigError(f"clips must be a whole number of clips per item from 1 to 64, got {clips!r}")
        embed_dim = embed_dim or cfg["out_dim"]
        scale, learnable = LOGIT_SCALE.get(m, (1 / 0.07, False))
        modality = "video" if video else MODALITY[m]
        super().__init__(modality, trunk, cfg["width"], embed_dim, "linear", scale, learnable)
        self.head_kind = head
        self.head = imagebind_head(cfg) if head == "imagebind" else build_head(head, cfg["width"], embed_dim)
        self.cfg = self.trunk.cfg
        self.clips = clips
        self.tokenizer = CLIPTokenizer(find_bpe_vocab(bpe_path), cfg["context_length"]) if m == "text" else None
        self.takes_text = m == "text"
        self.file_suffixes = VIDEO_SUFFIXES if video else FILE_SUFFIXES.get(m)

    def share_trunk_with(self, other: ModalityEncoder, mode: Literal["share", "copy"] = "share") -> ImageBindEncoder:
        """Run on ``other``'s trunk, as ImageBind runs videos through its vision tower: ``"share"`` ties the
        weights (stored once when saved), ``"copy"`` copies them once. Both towers must have one config."""
        if not isinstance(other, ImageBindEncoder) or other.cfg != self.cfg:
            raise ConfigError(
                f"{self.modality} tower: share_trunk_with needs an ImageBind tower of the same configuration "
                f"({self.cfg['modality']}, width {self.cfg['width']}, depth {self.cfg['depth']}); the "
                f"{other.modality!r} encoder is not one (build both from one checkpoint)"
            )
        if mode == "share":
            self.trunk = other.trunk
        elif mode == "copy":
            self.trunk.load_state_dict(other.trunk.state_dict())
        else:
            raise ConfigError(f"share_trunk_with mode: expected 'share' or 'copy', got {mode!r}")
        return self

    def preprocess(self, item: Any) -> Tensor:
        m, cfg = self.cfg["modality"], self.cfg
        if m == "text":
            if not isinstance(item, str):
                raise InputError(f"ImageBind's text tower takes strings, got a {type(item).__name__}")
            return self.tokenizer(item)
        if self.modality == "video":
            frames, fps = _read_video_with_rate(item)
            return video_clips(frames, fps, cfg["input_size"][-1], self.clips or 5)
        if m == "vision":
            return image_pixels(item, cfg["input_size"][-1])
        if m == "audio":
            return audio_clips(load_waveform(item), *cfg["input_size"], clips=self.clips or 3)
        if m == "imu":
            return _crop_or_pad(load_imu(item, IMU_RATE), cfg["input_size"][0])
        unit = depth_to_unit(load_depth(item), "disparity") if m == "depth" else thermal_to_unit(load_thermal(item))
        size = cfg["input_size"][-1]
        unit = torch.nan_to_num(unit[None], nan=0.0)  # missing depth: 0 (infinitely far)
        return TF.center_crop(TF.resize(unit, size, TF.InterpolationMode.BICUBIC, antialias=True), size)

    def collate(self, samples: list[Tensor]) -> Tensor | ClipBatch:
        if self.modality in ("audio", "video"):
            return self.collate_clips(samples)
        return torch.stack(list(samples))

    def example_inputs(self, n: int, seed: int = 0) -> list:
        m = self.cfg["modality"]
        rng = np.random.default_rng(seed)
        if m == "text":
            return [f"a photo of {i} dogs, number {int(rng.integers(100))}" for i in range(n)]
        if self.modality == "video":
            return example_videos(n, seed)
        if m == "vision":
            return example_images(n, seed)
        if m == "audio":  # 0.5, 0.75, ... s: shorter than a clip, so padding is exercised
            return [(rng.standard_normal(8000 + 4000 * i) * 0.1).astype(np.float32) for i in range(n)]
        if m == "imu":
            return [rng.standard_normal((IMU_CHANNELS, 300 + 50 * i)).astype(np.float32) for i in range(n)]
        return [rng.uniform(0.5, 8.0, (24, 32 + 4 * i)).astype(np.float32) for i in range(n)]

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def load_imagebind(self, state: dict[str, Tensor], where: str) -> None:
        """Load this tower's tensors from an ImageBind-format state dict (a new head keeps its initialisation)."""
        m = self.cfg["modality"]
        ours = from_imagebind(state, m, where)
        if self.head_kind != "imagebind":
            ours = {k: v for k, v in ours.items() if not k.startswith("head.")}
        if "log_logit_scale" in ours:
            ours["log_logit_scale"] = ours["log_logit_scale"].reshape(())
        own = self.state_dict()
        for key, value in ours.items():
            if key in own and own[key].shape != value.shape:
                raise ConfigError(
                    f"{where}: {key!r} has shape {tuple(value.shape)}; the {m} tower expects {tuple(own[key].shape)}"
                )
        missing, unexpected = self.load_state_dict(ours, strict=False)
        # vision has no logit scale in ImageBind (it is the anchor); a new head keeps its own initialisation
        missing = [
            k
            for k in missing
            if k != "log_logit_scale" and not (k.startswith("head.") and self.head_kind != "imagebind")
        ]
        if missing or unexpected:
            raise ConfigError(f"{where}: the {m} tower lacks {', '.join(missing[:5])} {unexpected[:5] or ''}".rstrip())

    def export_assets(self, directory: Path) -> dict[str, Any]:
        """The sizes, so the tower is rebuilt without the checkpoint (its weights are in the saved model)."""
        kwargs: dict[str, Any] = {"checkpoint": None, "config": dict(self.cfg)}
        if self.tokenizer is not None:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.tokenizer.vocab_path, directory / VOCAB_FILE)
            kwargs["bpe_path"] = str(Path(directory.parent.name) / directory.name / VOCAB_FILE)
        return kwargs


def imagebind_head(cfg: dict[str, Any]) -> nn.Module:
    """ImageBind's projection: bias-free, after dropout 0.5 for IMU (its head's LayerNorm is in the trunk)."""
    projection = nn.Linear(cfg["width"], cfg["out_dim"], bias=False)
    return nn.Sequential(nn.Dropout(0.5), projection) if cfg["modality"] == "imu" else projection


def _crop_or_pad(signal: Tensor, length: int) -> Tensor:
    """``(6, T)`` -> ``(6, length)``: the middle ``length`` samples, or zero-padded at the end."""
    if signal.shape[1] >= length:
        start = (signal.shape[1] - length) // 2
        return signal[:, start : start + length].contiguous()
    return F.pad(signal, (0, length - signal.shape[1]))


def _read_video_with_rate(item: Any) -> tuple[np.ndarray, float]:
    """Frames ``(T, H, W, 3)`` uint8 and their rate: a file (its stream's rate), ``(frames, fps)``, or frames at 30."""
    if isinstance(item, tuple) and len(item) == 2:
        frames, fps = item
        if not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
            raise InputError(f"(frames, fps) video item: fps must be a positive number, got {fps!r}")
        return load_frames(frames), float(fps)
    if isinstance(item, (str, os.PathLike)):
        frames, fps = read_video_with_rate(item)
        return frames, fps or 30.0
    return load_frames(item), 30.0


# ---- the registered factories ------------------------------------------------------------------------------------
PRETRAINED = f"ImageBind checkpoint (checkpoint=PATH; {CHECKPOINT_URL})"
# the arguments that name files: bindkit validate checks they exist, a saved model's config.json may name them only
# inside its folder (bind.registry.FileArg)
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


def _args_check(modality: str) -> Callable[[Mapping[str, Any]], None]:
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


def _build(
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
    check_weights(modality, checkpoint, config, random_init)
    state, where = None, None
    if checkpoint is not None:
        where = f"ImageBind checkpoint {str(checkpoint)!r}"
        state = read_checkpoint(checkpoint)
        audio = {k: kwargs[k] for k in ("n_mels", "target_length") if kwargs.get(k)}
        config = infer_config(state, modality, num_heads, where=where, **audio)
    elif config is None:
        config = _released_config(modality)
    check_config(config)
    config = {**config, "heads": num_heads or config["heads"]}
    encoder = ImageBindEncoder(config, head, embed_dim, kwargs.get("bpe_path"), kwargs.get("clips"), video)
    if state is not None and not encoder.log_logit_scale.is_meta:  # on the meta device (bind.budget) sizes only
        encoder.load_imagebind(state, where)
    return encoder


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


def _released_config(modality: str) -> dict[str, Any]:
    """imagebind_huge's sizes (random weights): a tower to train from scratch, or to load a saved model into."""
    return tower_config(modality, *RELEASED[modality], out_dim=1024, **RELEASED_SIZES[modality])


TINY_SIZES = {  # a small model in ImageBind's format, for tests: every tower 32 wide, 1 block, 2 heads, 16-d output
    "vision": {"kernel": [2, 4, 4], "stride": [2, 4, 4], "input_size": [16, 16]},
    "text": {"vocab_size": 49408, "context_length": 77},
    "audio": {"kernel": [16, 16], "stride": [10, 10], "input_size": [128, 204]},
    "depth": {"kernel": [8, 8], "stride": [8, 8], "input_size": [32, 32]},
    "thermal": {"kernel": [8, 8], "stride": [8, 8], "input_size": [32, 32]},
    "imu": {"kernel": [8], "stride": [8], "input_size": [400]},
}


def tiny_config(modality: str) -> dict[str, Any]:
    return tower_config(modality, width=32, depth=1, heads=2, out_dim=16, **TINY_SIZES[modality])


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random six-tower model in ImageBind's checkpoint format (bindkit's own modules, renamed), unless one is there."""
    if path.is_file():
        return path
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in RELEASED:
            cfg = tiny_config(m)
            tower = nn.Module()  # the weights of an ImageBindEncoder, without its preprocessing (no vocabulary needed)
            tower.trunk, tower.head = ImageBindTrunk(cfg), imagebind_head(cfg)
            tower.log_logit_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE.get(m, (1 / 0.07, False))[0])))
            state.update(to_imagebind(tower.state_dict(), m))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # whole or absent, with another process writing the same file
    return path


def _tiny(scratch_dir: Path) -> dict[str, Any]:
    return {"checkpoint": str(save_tiny_checkpoint(scratch_dir / "imagebind_tiny.pth")), "num_heads": 2}


@register_encoder(
    "image", pretrained=PRETRAINED, tiny=_tiny, augmenter=ImageAugment, files=FILES, check_args=_args_check("vision")
)
def imagebind_image(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ImageBindEncoder:
    """ImageBind's vision tower (ViT-H/14 in the release) on images: 224 px, CLIP's normalisation."""
    return _build("vision", checkpoint, config, num_heads, head, embed_dim, random_init)


@register_encoder(
    "video", pretrained=PRETRAINED, tiny=_tiny, augmenter=VideoAugment, files=FILES, check_args=_args_check("vision")
)
def imagebind_video(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
    clips: int = 5,
) -> ImageBindEncoder:
    """ImageBind's vision tower on videos: five 2 s clips of two frames, three crops each, averaged."""
    return _build("vision", checkpoint, config, num_heads, head, embed_dim, random_init, video=True, clips=clips)


@register_encoder(
    "text",
    pretrained=PRETRAINED,
    tiny=_tiny,
    check_args=_args_check("text"),
    files={**FILES, "bpe_path": FileArg(f"expected CLIP's {VOCAB_FILE} (from {VOCAB_URL})")},
)
def imagebind_text(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
    bpe_path: str | None = None,
) -> ImageBindEncoder:
    """ImageBind's text tower (OpenCLIP ViT-H's): CLIP BPE, 77 tokens, causal attention, end-token pooling."""
    return _build("text", checkpoint, config, num_heads, head, embed_dim, random_init, bpe_path=bpe_path)


@register_encoder("audio", pretrained=PRETRAINED, tiny=_tiny, files=FILES, check_args=_args_check("audio"))
def imagebind_audio(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
    clips: int = 3,
    n_mels: int = 128,
    target_length: int = 204,
) -> ImageBindEncoder:
    """ImageBind's audio tower: 16 kHz, three 2 s clips, 128-bin Kaldi fbank of 204 frames, averaged."""
    return _build(
        "audio",
        checkpoint,
        config,
        num_heads,
        head,
        embed_dim,
        random_init,
        clips=clips,
        n_mels=n_mels,
        target_length=target_length,
    )


@register_encoder("depth", pretrained=PRETRAINED, tiny=_tiny, files=FILES, check_args=_args_check("depth"))
def imagebind_depth(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ImageBindEncoder:
    """ImageBind's depth tower: depth in metres as disparity in [0, 1], 224 px."""
    return _build("depth", checkpoint, config, num_heads, head, embed_dim, random_init)


@register_encoder("thermal", pretrained=PRETRAINED, tiny=_tiny, files=FILES, check_args=_args_check("thermal"))
def imagebind_thermal(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ImageBindEncoder:
    """ImageBind's thermal tower: one channel min-max scaled to [0, 1], 224 px."""
    return _build("thermal", checkpoint, config, num_heads, head, embed_dim, random_init)


@register_encoder("imu", pretrained=PRETRAINED, tiny=_tiny, files=FILES, check_args=_args_check("imu"))
def imagebind_imu(
    checkpoint: str | None = None,
    config: dict[str, Any] | None = None,
    num_heads: int | None = None,
    head: str = "imagebind",
    embed_dim: int | None = None,
    random_init: bool = False,
) -> ImageBindEncoder:
    """ImageBind's IMU tower: 6 channels (accelerometer, gyroscope) of 2,000 samples at 200 Hz."""
    return _build("imu", checkpoint, config, num_heads, head, embed_dim, random_init)
