"""The audio encoders' feature frontend: waveforms -> normalised log-mel or Kaldi fbank features.

:class:`AudioFrontend` is a plain dataclass, not an ``nn.Module``: an encoder's ``preprocess`` runs it on the CPU
(in DataLoader workers when training, between the augmenter's waveform changes and its SpecAugment masks), and
the encoder's ``.to(device)`` leaves it there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from bind import ConfigError

from ._optional import optional

FeatureKind = Literal["logmel", "fbank"]
NormKind = Literal["utterance", "utterance_bins", "fixed", "none"]


@dataclass
class AudioFrontend:
    """Waveforms ``(..., samples)`` -> normalised log-mel features ``(..., n_mels, frames)``.

    ``features="logmel"``: power mel spectrogram (25 ms Hann window, 10 ms hop, centred frames) and
    ``log(mel + eps)``. ``features="fbank"``: Kaldi filter banks as ImageBind computes them (waveform
    mean removed, Hanning window, no dither, edge frames snipped). ``normalize="utterance"`` uses the
    mean and std of each clip's real frames (``valid_samples``), so padding changes neither;
    ``"utterance_bins"`` subtracts one mean per mel bin instead; ``"fixed"`` uses ``mean``/``std``
    (AudioSet fbank statistics by default). ``lifter=K`` keeps the first K cepstral coefficients of each
    frame (the DCT of its log-mel spectrum) and turns them back into K-smooth log-mel bins: the vocal tract's
    envelope (what the word is) without the harmonics of the voice's pitch (who says it).

    Example::

        frontend = AudioFrontend(sample_rate=8000, n_mels=64)
        frontend(torch.randn(4, 8000)).shape   # (4, 64, 101)
    """

    sample_rate: int = 8000
    features: FeatureKind = "logmel"
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float | None = 4000.0
    normalize: NormKind = "utterance"
    mean: float = -4.27
    std: float = 9.14
    frame_ms: float = 25.0
    hop_ms: float = 10.0
    eps: float = 1e-8  # about the power of 16-bit quantisation noise, so digital silence looks like quiet audio
    lifter: int | None = None  # keep this many cepstral coefficients: the spectral envelope without pitch harmonics
    win_length: int = field(init=False)
    hop_length: int = field(init=False)
    n_fft: int = field(init=False)

    def __post_init__(self) -> None:
        if self.features not in ("logmel", "fbank"):
            raise ConfigError(f"features must be 'logmel' or 'fbank', got {self.features!r}")
        if self.normalize not in ("utterance", "utterance_bins", "fixed", "none"):
            raise ConfigError(
                f"normalize must be 'utterance', 'utterance_bins', 'fixed' or 'none', got {self.normalize!r}"
            )
        nyquist = self.sample_rate / 2
        if not 0 <= self.f_min < (self.f_max or nyquist) <= nyquist:
            raise ConfigError(
                f"need 0 <= f_min < f_max <= {nyquist} Hz (half of sample_rate), got {self.f_min}, {self.f_max}"
            )
        self.win_length = round(self.sample_rate * self.frame_ms / 1000)
        self.hop_length = round(self.sample_rate * self.hop_ms / 1000)
        self.n_fft = 2 ** math.ceil(math.log2(self.win_length))
        self.window = torch.hann_window(self.win_length)
        if self.lifter is not None and not 1 <= self.lifter <= self.n_mels:
            raise ConfigError(
                f"lifter must be a number of cepstral coefficients in 1..n_mels={self.n_mels}, got {self.lifter}"
            )
        # the log-mel spectrum through its first `lifter` DCT coefficients and back: a smooth envelope, same shape
        self.smoother = None
        if self.lifter is not None:
            AF = optional("torchaudio.functional")

            dct = AF.create_dct(self.lifter, self.n_mels, norm="ortho")  # (n_mels, lifter)
            self.smoother = dct @ dct.T
        if self.features == "logmel":  # Kaldi fbank builds its own filters
            AF = optional("torchaudio.functional")

            self.mel_filters = AF.melscale_fbanks(
                self.n_fft // 2 + 1, self.f_min, self.f_max or nyquist, self.n_mels, self.sample_rate
            )

    def num_frames(self, num_samples: int) -> int:
        """Frames the frontend makes from ``num_samples`` samples."""
        if self.features == "logmel":
            return num_samples // self.hop_length + 1
        return 0 if num_samples < self.win_length else 1 + (num_samples - self.win_length) // self.hop_length

    def __call__(self, waveform: Tensor, valid_samples: Tensor | None = None) -> Tensor:
        flat = rearrange(waveform.float(), "... n -> (...) n")
        if self.features == "logmel":
            spec = torch.stft(
                flat,
                self.n_fft,
                self.hop_length,
                self.win_length,
                self.window,
                pad_mode="constant",
                return_complex=True,
            )
            feats = torch.log(torch.einsum("bft,fm->bmt", spec.abs() ** 2, self.mel_filters) + self.eps)
        else:
            feats = torch.stack([self._fbank(row) for row in flat])
        if self.smoother is not None:
            feats = torch.einsum("bmt,mn->bnt", feats, self.smoother)
        if self.normalize == "fixed":
            feats = (feats - self.mean) / self.std
        elif self.normalize != "none":
            feats = self._utterance_norm(feats, valid_samples)
        return feats.reshape(*waveform.shape[:-1], *feats.shape[-2:])

    def _fbank(self, wave: Tensor) -> Tensor:
        if wave.shape[-1] < self.win_length:
            wave = F.pad(wave, (0, self.win_length - wave.shape[-1]))
        kaldi = optional("torchaudio.compliance.kaldi")

        feats = kaldi.fbank(
            (wave - wave.mean())[None],
            htk_compat=True,
            sample_frequency=self.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.n_mels,
            dither=0.0,
            frame_length=self.frame_ms,
            frame_shift=self.hop_ms,
            low_freq=self.f_min,
            high_freq=self.f_max or 0.0,  # Kaldi: 0 means the Nyquist frequency
        )
        return feats.T  # (n_mels, frames)

    def _utterance_norm(self, feats: Tensor, valid_samples: Tensor | None) -> Tensor:
        frames = feats.shape[-1]
        if valid_samples is None:
            mask = feats.new_ones(feats.shape[0], 1, frames, dtype=torch.bool)
        else:
            valid = torch.as_tensor([max(1, min(frames, self.num_frames(int(v)))) for v in valid_samples.reshape(-1)])
            mask = (torch.arange(frames)[None] < valid[:, None])[:, None]
        frames_real = mask.sum(-1, keepdim=True)  # (N, 1, 1)
        mean = (feats * mask).sum(-1, keepdim=True) / frames_real  # (N, n_mels, 1)
        # "utterance_bins" keeps one mean per mel bin, removing a speaker's or a microphone's spectral tilt as
        # cepstral mean normalisation does; "utterance" takes one mean for the clip
        if self.normalize != "utterance_bins":
            mean = mean.mean(-2, keepdim=True)
        std = (((feats - mean) * mask) ** 2).sum((-2, -1), keepdim=True).div(frames_real * feats.shape[-2]).sqrt()
        feats = (feats - mean) / std.clamp_min(1e-3)  # silent clips have std 0
        # Padding becomes each bin's quietest real frame, as if the recording's own background went on: digital
        # zeros far below the noise floor would mark where each utterance ends and weigh on the statistics.
        floor = feats.masked_fill(~mask, math.inf).amin(-1, keepdim=True)
        return torch.where(mask, feats, floor)
