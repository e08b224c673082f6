"""ImageBind's preprocessing of raw items (its ``imagebind/data.py``), and bindkit's for the towers it ships no
loader for (depth, thermal, IMU: :meth:`~encoders.imagebind.encoder.ImageBindEncoder.preprocess`)."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bind import InputError

from .._optional import optional
from ..audio_io import load_audio
from ..image_io import load_rgb_pil
from ..video_io import load_frames, read_video_with_rate
from .checkpoint_shapes import VIDEO_FRAMES

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
AUDIO_RATE, AUDIO_MEAN, AUDIO_STD = 16000, -4.268, 9.138
IMU_RATE = 200


def image_pixels(item: Any, size: int) -> Tensor:
    """ImageBind's image transform: RGB, short side to ``size`` (bicubic), centre crop, CLIP's mean and std."""
    import torchvision.transforms.functional as TF

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
    kaldi = optional("torchaudio.compliance.kaldi")

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


def crop_or_pad(signal: Tensor, length: int) -> Tensor:
    """``(6, T)`` -> ``(6, length)``: the middle ``length`` samples, or zero-padded at the end."""
    if signal.shape[1] >= length:
        start = (signal.shape[1] - length) // 2
        return signal[:, start : start + length].contiguous()
    return F.pad(signal, (0, length - signal.shape[1]))


def load_video_with_rate(item: Any) -> tuple[np.ndarray, float]:
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
