"""Training-time audio augmentation: what a speech engineer reaches for first.

Waveform-level (before the encoder's frontend): a random onset (silence before the sound), speed
perturbation (resampling by a random factor changes tempo and pitch together, like Kaldi's speed
perturbation: a cheap stand-in for new vocal tracts, which moved unseen-speaker accuracy most in
this project's calibration), gain and additive noise at a random SNR. Feature-level (after it): a
mel-axis warp (another vocal tract length) and SpecAugment frequency and time masks.

The audio encoders register :class:`AudioAugment` as their augmenter (``register_encoder(...,
augmenter=AudioAugment)``); a recipe's ``train_data.augment`` mapping sets its knobs. Every draw
comes from the ``torch.Generator`` the dataset seeds per (seed, epoch, item), so a run is
reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio_io import load_audio


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def spread(bounds: tuple[float, float] | None, n: int) -> list[float]:
    """``n`` factors spaced evenly in log scale over ``bounds`` (their geometric mean for one; 1.0 without bounds)."""
    if bounds is None:
        return [1.0] * n
    if n == 1:
        return [math.sqrt(bounds[0] * bounds[1])]
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return [math.exp(low + (high - low) * i / (n - 1)) for i in range(n)]


def view_factors(bounds: tuple[float, float] | None, n: int) -> list[float]:
    """Factors of up to ``n`` test-time views: 1.0 first (the item as it is), then ``n - 1`` spread over ``bounds``;
    a factor equal to one already listed is dropped, so a knob that is off gives the one plain view."""
    factors = [1.0]
    for f in spread(bounds, n - 1) if bounds and n > 1 else []:
        if all(abs(f - kept) > 1e-6 for kept in factors):
            factors.append(f)
    return factors


@dataclass
class AudioAugment:
    """Augment raw ``(waveform, sample_rate)`` items and their features. 0 or None turns a knob off."""

    shift: float = 0.15  # max silence added before the sound, as a fraction of its length
    speed: tuple[float, float] | None = (0.8, 1.25)  # resampling factor range
    gain_db: float = 6.0  # +- gain
    noise_snr_db: tuple[float, float] | None = (15.0, 40.0)  # white noise at an SNR in this range
    freq_warp: tuple[float, float] | None = None  # stretch the mel axis by a factor in this range (VTLP-like)
    freq_masks: int = 2  # SpecAugment masks over mel bins
    freq_mask_width: int = 8
    time_masks: int = 2  # SpecAugment masks over frames
    time_mask_width: int = 10

    def augment_raw(self, item: Any, g: torch.Generator) -> tuple[np.ndarray, int] | np.ndarray:
        """A file, ``(waveform, sample_rate)`` or array -> the augmented mono waveform at its own rate (a file's
        or a pair's as a pair, an array's as an array)."""
        x, rate = _mono(item)
        if self.speed:
            factor = _uniform(g, *self.speed)
            # linear interpolation is enough here (speech energy sits far below 4 kHz at 8 kHz)
            new_len = max(8, int(round(x.numel() / factor)))
            x = F.interpolate(x[None, None], size=new_len, mode="linear", align_corners=False)[0, 0]
        if self.shift:  # a random onset: up to shift x length of silence before the sound
            onset = int(torch.randint(0, int(self.shift * x.numel()) + 1, (), generator=g))
            x = F.pad(x, (onset, 0))
        if self.gain_db:
            x = x * 10 ** (_uniform(g, -self.gain_db, self.gain_db) / 20)
        if self.noise_snr_db:
            snr = _uniform(g, *self.noise_snr_db)
            power = x.pow(2).mean().clamp(min=1e-10)
            x = x + torch.randn(x.shape, generator=g) * (power / 10 ** (snr / 10)).sqrt()
        return x.numpy() if rate is None else (x.numpy(), rate)

    def test_views(self, n: int) -> list[AudioAugment]:
        """Up to ``n`` fixed views for test-time augmentation: the recording as it is, then other vocal tract
        lengths (``freq_warp`` factors spread over its range in log scale), or, without it, other speeds; no
        shift, gain, noise or masks."""
        fixed = {"shift": 0, "gain_db": 0, "noise_snr_db": None, "freq_masks": 0, "time_masks": 0}
        knob = "freq_warp" if self.freq_warp else "speed"
        factors = view_factors(getattr(self, knob), n)
        return [
            AudioAugment(**fixed, **{"freq_warp": None, "speed": None, knob: (f, f) if f != 1 else None})
            for f in factors
        ]

    def augment_tensor(self, feats: Tensor, g: torch.Generator) -> Tensor:
        """Frequency warp and SpecAugment masks on (..., n_mels, frames) features, masks filled with the mean."""
        if self.freq_warp:
            feats = warp_frequency(feats, _uniform(g, *self.freq_warp))
        feats = feats.clone()
        fill = feats.mean()
        n_mels, frames = feats.shape[-2:]
        for count, width, size, dim in (
            (self.freq_masks, self.freq_mask_width, n_mels, -2),
            (self.time_masks, self.time_mask_width, frames, -1),
        ):
            for _ in range(count):
                w = int(torch.randint(0, min(width, size) + 1, (), generator=g))
                start = int(torch.randint(0, size - w + 1, (), generator=g))
                feats.narrow(dim, start, w).fill_(fill)
        return feats


def _mono(item: Any) -> tuple[Tensor, int | None]:
    """A raw audio item read as :func:`~encoders.audio_io.load_audio` reads it, mixed down, at its own rate
    (``None`` for a bare array: no rate of its own)."""
    if isinstance(item, tuple) and len(item) == 2:
        rate = item[1]
    elif isinstance(item, (str, os.PathLike)):
        import soundfile as sf

        try:
            rate = sf.info(os.fspath(item)).samplerate
        except Exception:  # not audio: let load_audio say so, naming the file
            rate = 16000
    else:  # a bare array is at the encoder's rate, whatever it is: it stays a bare array
        return load_audio(item, 16000), None
    return load_audio(item, rate), rate


def warp_frequency(feats: Tensor, factor: float) -> Tensor:
    """Stretch (factor > 1) or squeeze the mel axis of (..., n_mels, frames), keeping its size.

    A longer or shorter vocal tract moves every formant by about the same factor: this imitates
    another speaker (vocal tract length perturbation) without touching the time axis.
    """
    n_mels, frames = feats.shape[-2:]
    flat = feats.reshape(-1, 1, n_mels, frames)
    size = max(2, round(n_mels * factor))
    warped = F.interpolate(flat, size=(size, frames), mode="bilinear", align_corners=True)
    warped = warped[:, :, :n_mels] if size >= n_mels else F.pad(warped, (0, 0, 0, n_mels - size), mode="replicate")
    return warped.reshape(feats.shape)
