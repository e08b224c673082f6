"""Video encoders: any registered image encoder run frame by frame plus temporal pooling, and HF VideoMAE.

A raw video item is a path to a video file (mp4, webm, avi: anything FFmpeg decodes) or an array/tensor
of frames shaped (T, H, W), (T, H, W, C) or (T, C, H, W) with C in 1, 3, 4, read by :mod:`encoders.video_io`.
Frames are grouped into clips of ``num_frames``: a long video gives up to ``max_clips`` evenly
spaced clips whose embeddings are averaged; a short one repeats its last frame.

Example::

    enc = create_encoder("video_frames", frame_encoder="digits_cnn", num_frames=8, temporal="attention")
    z = enc.embed(["moving_seven.mp4", np.zeros((16, 28, 28), np.uint8)])  # (2, 128), unit norm
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from bind import ClipBatch, ConfigError, HeadKind, InputError, ModalityEncoder, create_encoder, register_encoder

from ._hf import TINY_TRANSFORMER, HFEncoder, hf_path_check, load_hf_model, load_hf_processor, save_tiny_hf
from ._transformer import pre_norm_layer
from .image_augment import PLAIN, VideoAugment, augments_as, border_colour, frames_as_float
from .image_io import scale_to_unit
from .video_io import VIDEO_SUFFIXES, clip_indices, example_videos, frames_to_unit_float, load_frames

TemporalKind = Literal["mean", "attention"]


class TemporalMean(nn.Module):
    """``(B, T, D) -> (B, D)``: frame order does not matter."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


class TemporalAttention(nn.Module):
    """``(B, T, D) -> (B, D)``: a pre-norm transformer layer over the frames with learned positions, CLS readout."""

    def __init__(self, dim: int, num_frames: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_frames + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layer = pre_norm_layer(dim, heads, 4 * dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        return self.norm(self.layer(x)[:, 0])


class VideoTrunk(nn.Module):
    """What the video tower trains: the frame encoder's trunk and the temporal pooling (run by the encoder)."""

    def __init__(self, frames: nn.Module, temporal: nn.Module) -> None:
        super().__init__()
        self.frames, self.temporal = frames, temporal


def _as_tchw(frames: np.ndarray) -> Tensor:
    """Frames ``(T, H, W[, C])`` as :func:`load_image` reads each one: ``(T, C, H, W)``, alpha dropped, 16 bits to
    floats; channels other than 1, 3, 4 are refused."""
    array = frames if frames.ndim == 4 else frames[..., None]
    if array.shape[-1] not in (1, 3, 4):
        raise InputError(f"video frames of shape {frames.shape}: expected 1, 3 or 4 channels")
    if array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)[:, :3]


def _stack(samples: list[Any]) -> Tensor | dict[str, Tensor]:
    if isinstance(samples[0], dict):
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    return torch.stack(samples)


class VideoFramesEncoder(ModalityEncoder):
    """An image encoder's preprocess and trunk per frame, then temporal pooling and the video head."""

    file_suffixes = VIDEO_SUFFIXES

    def __init__(
        self,
        frame_encoder: ModalityEncoder,
        embed_dim: int,
        num_frames: int,
        temporal: TemporalKind,
        max_clips: int,
        frame_stride: int,
        temporal_heads: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        if num_frames < 1 or max_clips < 1 or frame_stride < 1:
            raise ConfigError(
                f"num_frames, max_clips, frame_stride must be >= 1: {num_frames}, {max_clips}, {frame_stride}"
            )
        dim = frame_encoder.trunk_dim
        if temporal == "mean":
            pool: nn.Module = TemporalMean()
        elif temporal == "attention":  # heads must divide dim: the largest divisor of dim up to temporal_heads
            pool = TemporalAttention(dim, num_frames, math.gcd(temporal_heads, dim))
        else:
            raise ConfigError(f"temporal must be 'mean' or 'attention', got {temporal!r}")
        trunk = VideoTrunk(frame_encoder.trunk, pool)
        super().__init__("video", trunk, dim, embed_dim, head, logit_scale, learnable_logit_scale)
        self.num_frames, self.max_clips, self.frame_stride = num_frames, max_clips, frame_stride
        self.temporal = temporal
        self._hold_frame_encoder(frame_encoder)

    # The frame encoder is held as a plain reference, not a submodule: of it, only its trunk belongs to the video
    # tower, registered as trunk.frames (the state_dict keys trunk.frames.*). Registered whole, its head and logit
    # scale would be parameters that never get a gradient, under new state_dict keys; and after
    # share_trunk_with(image_tower) it is the image tower itself, whose weights the model stores once, under that
    # tower. nn.Module.__setattr__ registers every module assigned to an attribute, so the reference goes into the
    # instance's __dict__ (where bind.model finds it, to record which module registers the frame encoder).
    @property
    def frame_encoder(self) -> ModalityEncoder:
        """The image encoder run on each frame (its preprocess and forward_features); its trunk is ``trunk.frames``."""
        return self.__dict__["_frame_encoder"]

    def _hold_frame_encoder(self, encoder: ModalityEncoder) -> None:
        self.__dict__["_frame_encoder"] = encoder

    def share_trunk_with(
        self, image_encoder: ModalityEncoder, mode: Literal["share", "copy"] = "share"
    ) -> VideoFramesEncoder:
        """Start the frame encoder from ``image_encoder``'s trunk (ImageBind: video goes through the image tower).

        ``"share"`` ties the trunk (one module: training or freezing either one changes both; the frames
        are then preprocessed as ``image_encoder`` does); ``"copy"`` copies its trunk weights once, which
        needs the same architecture.
        """
        if mode == "share":
            if image_encoder.trunk_dim != self.trunk_dim:
                raise ConfigError(
                    f"cannot share a trunk with {image_encoder.trunk_dim}-d features: this video encoder's temporal "
                    f"layer and head take {self.trunk_dim}; build it with the same frame_encoder as the image tower"
                )
            self.trunk.frames = image_encoder.trunk
            self._hold_frame_encoder(image_encoder)
        elif mode == "copy":
            try:
                self.trunk.frames.load_state_dict(image_encoder.trunk.state_dict())
            except RuntimeError as err:
                raise ConfigError(
                    f"cannot copy the image trunk into the video frame encoder ({err}); build the video encoder with "
                    "frame_encoder and frame_encoder_kwargs equal to the image encoder's name and arguments"
                ) from None
        else:
            raise ConfigError(f"mode must be 'share' or 'copy', got {mode!r}")
        return self

    def preprocess(self, item: Any) -> Tensor | dict[str, Tensor]:
        """Raw video -> ``(num_clips, num_frames, *frame)`` (a dict of those for dict-valued frame encoders)."""
        frames = load_frames(item)
        indices = clip_indices(len(frames), self.num_frames, self.max_clips, self.frame_stride)
        per_frame = {}
        for i in np.unique(indices):  # repeated frames are preprocessed once
            try:
                per_frame[i] = self.frame_encoder.preprocess(frames[i])
            except InputError as err:
                raise InputError(f"video frame {i}: {err}") from None
        return _stack([_stack([per_frame[i] for i in clip]) for clip in indices])

    def preprocess_many(
        self, items: Sequence[Any], augment: Any = None, generators: Sequence[torch.Generator] | None = None
    ) -> list[Any]:
        """Every frame the clips of a batch use, rendered together by the frame encoder
        (``ImageEncoder.preprocess_drawn``): the values of :meth:`preprocess` item by item, a fraction of the time."""
        if not getattr(self.frame_encoder, "renders_batches", False) or (
            augment is not None and not augments_as(augment, VideoAugment)
        ):
            return super().preprocess_many(items, augment, generators)
        rows, draws, fills, layout = [], [], [], []
        for k, item in enumerate(items):
            frames = load_frames(item)
            if augment is None:  # load_image's reading of each frame, for the whole array at once
                x, drawn = scale_to_unit(_as_tchw(frames), "video frames"), None
            else:  # VideoAugment.augment_raw's reading, and the check preprocess makes of what it returns
                x = frames_as_float(frames)
                x, drawn = scale_to_unit(x, "video frames"), augment.draw_clip(x.shape[0], generators[k])
            draw, fill = PLAIN, None
            if drawn is not None:
                x, draw = x[drawn[0]], drawn[1]
                fill = border_colour(x)
            clips = clip_indices(len(x), self.num_frames, self.max_clips, self.frame_stride)
            used = np.unique(clips)  # the frames preprocess reads, each once, as one image: one draw for all
            layout.append((used, clips))
            rows.append(x[used])
            draws.append(draw)
            fills.append(fill)
        out = self.frame_encoder.preprocess_drawn(rows, draws, fills)
        return [
            frames[torch.from_numpy(np.searchsorted(used, clips))]
            for frames, (used, clips) in zip(out, layout, strict=True)
        ]  # (num_clips, num_frames, C, S, S)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_videos(n, seed)

    def collate(self, samples: list[Any]) -> ClipBatch:
        if isinstance(samples[0], Tensor):
            return self.collate_clips(samples)
        batch = self.collate_clips([next(iter(s.values())) for s in samples])
        clips = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
        return ClipBatch(clips, batch.item_index, len(samples), batch.counts)

    def forward_features(self, batch: Tensor | dict[str, Tensor]) -> Tensor:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch
        if isinstance(batch, dict):
            flat: Any = {k: rearrange(v, "b t ... -> (b t) ...") for k, v in batch.items()}
        else:
            flat = rearrange(batch, "b t ... -> (b t) ...")
        feats = rearrange(self.frame_encoder.forward_features(flat), "(b t) d -> b t d", t=first.shape[1])
        return self.trunk.temporal(feats)

    def trunk_blocks(self) -> list[nn.Module]:
        extra = [self.trunk.temporal] if self.temporal == "attention" else []
        return self.frame_encoder.trunk_blocks() + extra

    def export_assets(self, directory: Path) -> dict[str, Any]:
        overrides = self.frame_encoder.export_assets(directory)
        if not overrides:
            return {}
        # A saved model resolves a top-level "path" against its folder, so the frame encoder's path goes there.
        kwargs = {**(self.build_args.get("kwargs", {}).get("frame_encoder_kwargs") or {}), **overrides}
        path = kwargs.pop("path", None)
        return {"frame_encoder_kwargs": kwargs} | ({"path": path} if path is not None else {})


@register_encoder(
    "video",
    augmenter=VideoAugment,
    tiny={
        "frame_encoder": "digits_cnn",
        "frame_encoder_kwargs": {"width": 4, "embed_dim": 16},
        "num_frames": 4,
        "embed_dim": 16,
        "temporal": "attention",
    },
)
def video_frames(
    frame_encoder: str = "digits_cnn",
    frame_encoder_kwargs: dict[str, Any] | None = None,
    embed_dim: int = 128,
    num_frames: int = 8,
    temporal: TemporalKind = "mean",
    max_clips: int = 2,
    frame_stride: int = 1,
    temporal_heads: int = 4,
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    path: str | None = None,
) -> VideoFramesEncoder:
    """Any registered image encoder applied per frame, then mean or attention pooling over time.

    ``path`` is passed to the frame encoder (a hub id or local directory of a Hugging Face image tower).

    Example: ``create_encoder("video_frames", frame_encoder="tv_resnet18", frame_encoder_kwargs={"weights_path": W})``
    """
    kwargs = dict(frame_encoder_kwargs or {}) | ({"path": path} if path is not None else {})
    frames = create_encoder(frame_encoder, **kwargs)
    pooling = (num_frames, temporal, max_clips, frame_stride, temporal_heads)
    return VideoFramesEncoder(frames, embed_dim, *pooling, head, logit_scale, learnable_logit_scale)


class VideoMAEEncoder(HFEncoder):
    """A Hugging Face VideoMAE model with its image processor; features are the mean of the last hidden state."""

    file_suffixes = VIDEO_SUFFIXES

    def __init__(
        self,
        model: Any,
        processor: Any,
        embed_dim: int,
        max_clips: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        trunk_dim = model.config.hidden_size
        super().__init__("video", model, processor, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        self.num_frames, self.max_clips = model.config.num_frames, max_clips

    def preprocess(self, item: Any) -> Tensor:
        """Raw video -> pixel values ``(num_clips, num_frames, 3, size, size)``."""
        frames = frames_to_unit_float(load_frames(item))
        clips = [list(frames[clip]) for clip in clip_indices(len(frames), self.num_frames, self.max_clips)]
        return self.processor(clips, do_rescale=False, return_tensors="pt")["pixel_values"]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_videos(n, seed)

    def collate(self, samples: list[Tensor]) -> ClipBatch:
        return self.collate_clips(samples)

    def forward_features(self, batch: Tensor) -> Tensor:
        return self.trunk(pixel_values=batch).last_hidden_state.mean(1)


def _tiny_videomae(scratch_dir: Path) -> dict[str, Any]:
    """Save a tiny random VideoMAE model and its image processor under ``scratch_dir`` (for tests)."""
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    dims = TINY_TRANSFORMER | {"intermediate_size": 37}
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, **dims)
    processor = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"path": save_tiny_hf(Path(scratch_dir) / "videomae", VideoMAEModel, config, processor), "embed_dim": 16}


@register_encoder(
    "video",
    augmenter=VideoAugment,
    pretrained="Hugging Face VideoMAEModel hub id or local directory (path)",
    tiny=_tiny_videomae,
    check_args=hf_path_check("hf_videomae"),
)
def hf_videomae(
    path: str,
    load_weights: bool = True,
    embed_dim: int = 128,
    max_clips: int = 2,
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
) -> VideoMAEEncoder:
    """Hugging Face VideoMAE (VideoMAEModel + VideoMAEImageProcessor) from a local directory, mean-pooled.

    Example: ``create_encoder("hf_videomae", path="models/videomae-base")`` where the directory was
    written by ``VideoMAEModel.save_pretrained`` and ``VideoMAEImageProcessor.save_pretrained``.
    """
    from transformers import VideoMAEImageProcessor, VideoMAEModel

    model = load_hf_model(VideoMAEModel, path, load_weights, what="hf_videomae")
    processor = load_hf_processor(VideoMAEImageProcessor, path, what="hf_videomae image processor")
    return VideoMAEEncoder(model, processor, embed_dim, max_clips, head, logit_scale, learnable_logit_scale)
