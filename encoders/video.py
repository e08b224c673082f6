"""Video encoders: any registered image encoder run frame by frame plus temporal pooling, and HF VideoMAE.

A raw video item is a path to a video file (mp4, webm, avi: anything FFmpeg decodes, read with
PyAV) or an array/tensor of frames shaped (T, H, W), (T, H, W, C) or (T, C, H, W) with C in 1, 3, 4.
Frames are grouped into clips of ``num_frames``: a long video gives up to ``max_clips`` evenly
spaced clips whose embeddings are averaged; a short one repeats its last frame.

Example::

    enc = create_encoder("video_frames", frame_encoder="digits_cnn", num_frames=8, temporal="attention")
    z = enc.embed(["moving_seven.mp4", np.zeros((16, 28, 28), np.uint8)])  # (2, 128), unit norm
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from bind import ClipBatch, ConfigError, InputError, ModalityEncoder, create_encoder, find_blocks, register_encoder
from bind.encoder import HeadKind

from ._hf import export_hf, load_hf_model, load_hf_processor

TemporalKind = Literal["mean", "attention"]
# codec and pixel format per container; 4:4:4 keeps the colour of small frames that 4:2:0 would blur
CODECS = {
    ".mp4": ("libx264", "yuv444p"),
    ".mkv": ("libx264", "yuv444p"),
    ".mov": ("libx264", "yuv444p"),
    ".avi": ("mjpeg", "yuvj444p"),
    ".webm": ("libvpx", "yuv420p"),
}


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".gif")  # what PyAV decodes


def example_videos(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random uint8 ``(T, H, W, C)`` videos, 5 frames of 28 x 28 RGB: every video encoder's ``example_inputs``."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8) for _ in range(n)]


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a file's first video stream to uint8 RGB ``(T, H, W, 3)``.

    Example::

        read_video("clip.mp4").shape   # (16, 28, 28, 3)
    """
    what = f"video file {os.fspath(path)!r}"
    if not Path(path).is_file():
        raise InputError(f"{what} does not exist; expected a video file (mp4, webm, avi, ...)")
    if Path(path).stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); expected a video file (mp4, webm, avi, ...): re-export it")
    try:
        with av.open(os.fspath(path)) as container:
            streams = container.streams.video
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(streams[0])] if streams else None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(
            f"{what} could not be decoded ({type(err).__name__}: {err}); expected a video file FFmpeg can read: "
            "check that it is complete (not truncated) and really a video"
        ) from None
    if frames is None:
        raise InputError(f"{what} has no video stream; expected a file with at least one video stream")
    if not frames:
        raise InputError(f"{what} holds no frames; expected at least one decodable frame")
    return np.stack(frames)


def write_video(
    path: str | os.PathLike[str], frames: np.ndarray | Tensor, fps: float = 8, codec: str | None = None, crf: int = 12
) -> Path:
    """Write uint8 frames ``(T, H, W, 3)`` or ``(T, H, W)`` (grayscale) to a video file with PyAV.

    The codec follows the suffix (.mp4/.mkv/.mov: H.264 4:4:4, .avi: MJPEG, .webm: VP8, even sizes
    only); ``crf`` trades size for fidelity in H.264 (0 is lossless, 12 is visually lossless).

    Example::

        write_video("moving_seven.mp4", np.zeros((16, 28, 28), np.uint8), fps=8)
    """
    path = Path(path)
    array = frames.detach().cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if array.ndim == 3:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
        raise ConfigError(
            f"write_video({str(path)!r}): expected non-empty uint8 frames (T, H, W, 3) or (T, H, W), "
            f"got {array.dtype} {array.shape}"
        )
    if path.suffix.lower() not in CODECS and codec is None:
        raise ConfigError(f"write_video: unknown suffix {path.suffix!r}; use one of {sorted(CODECS)} or pass codec=")
    default_codec, pix_fmt = CODECS.get(path.suffix.lower(), (codec, "yuv420p"))
    height, width = array.shape[1:3]
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ConfigError(f"write_video({str(path)!r}): {pix_fmt} needs even frame sizes, got {height}x{width}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec or default_codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if (codec or default_codec) == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's buffered frames
    return path


def load_frames(item: Any) -> np.ndarray:
    """Raw video item -> frames ``(T, H, W)`` or ``(T, H, W, C)`` as a numpy array (dtype kept)."""
    if isinstance(item, (str, os.PathLike)):
        return read_video(item)
    if not isinstance(item, (np.ndarray, Tensor)):
        raise InputError(
            f"cannot read a video from a {type(item).__name__}; expected a video file path or frames "
            "(T, H, W), (T, H, W, C) or (T, C, H, W)"
        )
    array = item.detach().cpu().numpy() if isinstance(item, Tensor) else np.asarray(item)
    if array.ndim == 4 and array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = rearrange(array, "t c h w -> t h w c")
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3, 4)):
        raise InputError(f"video array of shape {array.shape}: expected (T, H, W), (T, H, W, C) or (T, C, H, W)")
    if array.shape[0] == 0:
        raise InputError("video array has 0 frames; expected at least one frame")
    return array


def clip_indices(total: int, num_frames: int, max_clips: int, stride: int = 1) -> np.ndarray:
    """Frame indices ``(num_clips, num_frames)``: evenly spaced clips, the last frame repeated if too short."""
    span = (num_frames - 1) * stride + 1
    if total <= span:
        return np.minimum(np.arange(num_frames) * stride, total - 1)[None]
    starts = np.linspace(0, total - span, min(max_clips, math.ceil(total / span))).round().astype(int)
    return starts[:, None] + np.arange(num_frames) * stride


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
        self.layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, "gelu", batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        return self.norm(self.layer(x)[:, 0])


class VideoTrunk(nn.Module):
    """What the video tower trains: the frame encoder's trunk and the temporal pooling (run by the encoder)."""

    def __init__(self, frames: nn.Module, temporal: nn.Module) -> None:
        super().__init__()
        self.frames, self.temporal = frames, temporal


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
        self._set_frame_encoder(frame_encoder)

    def _set_frame_encoder(self, encoder: ModalityEncoder) -> None:
        # Not a submodule: only its trunk (registered as trunk.frames) belongs to the video tower; its head and
        # logit scale would be parameters that never get a gradient.
        object.__setattr__(self, "frame_encoder", encoder)

    def use_frame_encoder_from(
        self, image_encoder: ModalityEncoder, mode: Literal["share", "copy"] = "share"
    ) -> VideoFramesEncoder:
        """Start the frame encoder from ``image_encoder`` (ImageBind: video goes through the image tower).

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
            self._set_frame_encoder(image_encoder)
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

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_videos(n, seed)

    def collate(self, samples: list[Any]) -> ClipBatch:
        if isinstance(samples[0], Tensor):
            return self.collate_clips(samples)
        batch = self.collate_clips([next(iter(s.values())) for s in samples])
        return ClipBatch(
            {key: torch.cat([s[key] for s in samples]) for key in samples[0]}, batch.item_index, len(samples)
        )

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

    ``path`` is passed to the frame encoder (the local directory of a Hugging Face image tower).

    Example: ``create_encoder("video_frames", frame_encoder="tv_resnet18", frame_encoder_kwargs={"weights_path": W})``
    """
    kwargs = dict(frame_encoder_kwargs or {}) | ({"path": path} if path is not None else {})
    frames = create_encoder(frame_encoder, **kwargs)
    pooling = (num_frames, temporal, max_clips, frame_stride, temporal_heads)
    return VideoFramesEncoder(frames, embed_dim, *pooling, head, logit_scale, learnable_logit_scale)


def frames_to_unit_float(frames: np.ndarray, what: str = "video") -> Tensor:
    """Frames ``(T, H, W[, C])`` -> float RGB ``(T, 3, H, W)`` in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames if frames.ndim == 4 else frames[..., None]))
    x = rearrange(x, "t h w c -> t c h w")[:, :3]
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.dtype.is_floating_point or not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InputError(f"{what} frames must be uint8 (0-255) or finite floats in [0, 1]; got {x.dtype}")
    return x.float()


class VideoMAEEncoder(ModalityEncoder):
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
        super().__init__("video", model, model.config.hidden_size, embed_dim, head, logit_scale, learnable_logit_scale)
        self.processor, self.num_frames, self.max_clips = processor, model.config.num_frames, max_clips

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

    def trunk_blocks(self) -> list[nn.Module]:
        return find_blocks(self.trunk)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.processor)


def _tiny_videomae(scratch_dir: Path) -> dict[str, Any]:
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    path = Path(scratch_dir) / "videomae"
    if not (path / "config.json").is_file():
        config = VideoMAEConfig(
            image_size=32,
            patch_size=16,
            num_frames=4,
            tubelet_size=2,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
        VideoMAEModel(config).save_pretrained(path)
        VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return {"path": str(path), "embed_dim": 16}


@register_encoder("video", pretrained="local Hugging Face VideoMAEModel directory", tiny=_tiny_videomae)
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
