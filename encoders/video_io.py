"""Reading and writing video for the video encoders: files (with PyAV) and frame arrays -> frames, and clips.

A raw video item is a path to a video file (mp4, webm, avi: anything FFmpeg decodes, :data:`VIDEO_SUFFIXES`) or
an array/tensor of frames shaped (T, H, W), (T, H, W, C) or (T, C, H, W) with C in 1, 3, 4: :func:`load_frames`
reads either to a numpy array, and :func:`clip_indices` picks the frames of each clip. :func:`write_video` writes
frames to a file (the tests make their videos with it).

Example::

    frames = load_frames("moving_seven.mp4")   # (T, H, W, 3) uint8
    clip_indices(len(frames), num_frames=8, max_clips=2)   # (num_clips, 8) frame indices
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from bind import ConfigError, InputError

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
    return read_video_with_rate(path)[0]


def read_video_with_rate(path: str | os.PathLike[str]) -> tuple[np.ndarray, float | None]:
    """:func:`read_video`'s frames and the stream's average frame rate (None when the file states none)."""
    what = f"video file {os.fspath(path)!r}"
    if not Path(path).is_file():
        raise InputError(f"{what} does not exist; expected a video file (mp4, webm, avi, ...)")
    if Path(path).stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); expected a video file (mp4, webm, avi, ...): re-export it")
    import av

    try:
        with av.open(os.fspath(path)) as container:
            streams = container.streams.video
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(streams[0])] if streams else None
            rate = streams[0].average_rate if streams else None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise InputError(
            f"{what} could not be decoded ({type(err).__name__}: {err}); expected a video file FFmpeg can read: "
            "check that it is complete (not truncated) and really a video"
        ) from None
    if frames is None:
        raise InputError(f"{what} has no video stream; expected a file with at least one video stream")
    if not frames:
        raise InputError(f"{what} holds no frames; expected at least one decodable frame")
    return np.stack(frames), float(rate) if rate else None


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
    import av

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
