"""One ImageBind tower as a bindkit encoder: :class:`ImageBindEncoder` (preprocessing, trunk, head, loading)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from bind import ClipBatch, ConfigError, InputError, ModalityEncoder, build_head

from ..audio_io import AUDIO_SUFFIXES
from ..clip_bpe import VOCAB_FILE, CLIPTokenizer, find_bpe_vocab
from ..depth import depth_to_unit, load_depth
from ..image_io import IMAGE_SUFFIXES, example_images
from ..imu import load_imu
from ..thermal import load_thermal, thermal_to_unit
from ..video_io import VIDEO_SUFFIXES, example_videos
from .checkpoint_shapes import IMU_CHANNELS
from .keymaps import from_imagebind
from .preprocess import (
    IMU_RATE,
    audio_clips,
    crop_or_pad,
    image_pixels,
    load_video_with_rate,
    load_waveform,
    video_clips,
)
from .trunks import ImageBindTrunk, imagebind_head

# ImageBind's names of its modalities, and bindkit's modality for each tower
MODALITY = {"vision": "image", "text": "text", "audio": "audio", "depth": "depth", "thermal": "thermal", "imu": "imu"}
# the logit scales of ImageBind's postprocessors: (initial value, learnable); vision has none (it is the anchor)
LOGIT_SCALE = {
    "text": (1 / 0.07, True),
    "audio": (20.0, False),
    "depth": (5.0, False),
    "thermal": (10.0, False),
    "imu": (5.0, False),
}
# the files each tower reads (a video tower: VIDEO_SUFFIXES)
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
            frames, fps = load_video_with_rate(item)
            return video_clips(frames, fps, cfg["input_size"][-1], self.clips or 5)
        if m == "vision":
            return image_pixels(item, cfg["input_size"][-1])
        if m == "audio":
            return audio_clips(load_waveform(item), *cfg["input_size"], clips=self.clips or 3)
        if m == "imu":
            return crop_or_pad(load_imu(item, IMU_RATE), cfg["input_size"][0])
        unit = depth_to_unit(load_depth(item), "disparity") if m == "depth" else thermal_to_unit(load_thermal(item))
        size = cfg["input_size"][-1]
        unit = torch.nan_to_num(unit[None], nan=0.0)  # missing depth: 0 (infinitely far)
        import torchvision.transforms.functional as TF

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
