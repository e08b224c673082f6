"""Audio encoders: a log-mel CNN for short clips, an ImageBind-style spectrogram ViT, and HF AST.

A raw audio item is a path to a WAV/FLAC file, a ``(waveform, sample_rate)`` tuple, or a 1-D
``(samples,)`` / 2-D ``(channels, samples)`` array or tensor already at the encoder's sample rate.
It is mixed down to mono, resampled, and cut into clips of ``clip_seconds``: a long recording gives
up to ``max_clips`` evenly spaced clips whose embeddings are averaged, a short one is zero-padded.

The feature frontend (:class:`AudioFrontend`) holds no ``nn.Module`` so the data pipeline can reuse
it on batches of augmented waveforms (speed perturbation, gain) before SpecAugment.

Example::

    enc = create_encoder("audio_cnn", embed_dim=64)
    z = enc.embed(["recordings/7_jackson_0.wav", (np.zeros(16000), 16000)])  # (2, 64)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from einops import rearrange
from torch import Tensor, nn

from bind import ConfigError, InputError, ModalityEncoder, find_blocks, register_encoder
from bind.encoder import HeadKind

from ._hf import export_hf, load_hf_model, load_hf_processor

FeatureKind = Literal["logmel", "fbank"]
NormKind = Literal["utterance", "utterance_bins", "fixed", "none"]
MAX_CHANNELS = 16  # more "channels" than this means a (samples, channels) array was passed


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")  # what libsndfile decodes


def example_waveforms(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` quiet noise waveforms (float32, at the encoder's rate) of 4000, 5000, ... samples: clips and padding."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(4000 + 1000 * i).astype(np.float32) * 0.1 for i in range(n)]


def load_audio(item: Any, sample_rate: int) -> Tensor:
    """Raw audio item -> mono float32 waveform ``(samples,)`` at ``sample_rate``.

    A file is read whole: :func:`load_audio_clips` reads only the clips an encoder uses.

    Example::

        load_audio("stereo_44k.wav", 8000).shape   # (round(seconds * 8000),): mono, resampled
    """
    if isinstance(item, (str, os.PathLike)):
        what = f"audio file {os.fspath(item)!r}"
        with _open_audio(Path(item), what) as f:
            return _whole_file(f, what, sample_rate)
    if isinstance(item, tuple) and len(item) == 2:
        what = "(waveform, sample_rate) item"
        wave, rate = _as_tensor(item[0], what), item[1]
        if not isinstance(rate, (int, float, np.integer, np.floating)) or not 1 <= rate < math.inf:
            raise InputError(f"{what}: sample_rate must be a positive number of Hz (at least 1), got {rate!r}")
    elif isinstance(item, (np.ndarray, Tensor)):
        what, wave, rate = "audio array", _as_tensor(item, "audio array"), sample_rate
    else:
        raise InputError(
            f"cannot read audio from a {type(item).__name__}; expected a file path, a (waveform, sample_rate) "
            "tuple, or a 1-D/2-D array at the encoder's sample rate"
        )
    return _to_mono(wave, rate, what, MAX_CHANNELS, sample_rate)


def _to_mono(wave: Tensor, rate: float, what: str, max_channels: int, sample_rate: int) -> Tensor:
    """``(samples,)`` or ``(channels, samples)`` at ``rate`` -> checked mono ``(samples,)`` at ``sample_rate``."""
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2 or wave.shape[0] > max_channels:
        raise InputError(
            f"{what} has shape {tuple(wave.shape)}; expected (samples,) or (channels, samples) with at most "
            f"{max_channels} channels (transpose soundfile's (samples, channels) output with .T)"
        )
    if wave.shape[1] == 0:
        raise InputError(f"{what} is empty (0 samples); expected at least one sample of audio")
    _check_finite(wave, what)
    return _resample(wave.mean(0), rate, sample_rate)


def load_audio_clips(item: Any, sample_rate: int, clip_samples: int, max_clips: int) -> tuple[Tensor, Tensor]:
    """``split_clips(load_audio(item, sample_rate), clip_samples, max_clips)``, reading from a file only what it uses.

    A recording longer than ``max_clips`` clips is never read whole (an hour of 44.1 kHz audio is 600 MB of
    float32): each clip's window, plus the reach of the resampling filter, is read with seek + read. At the
    file's own rate the clips are the very samples :func:`split_clips` would cut; resampled, they agree with
    the whole-file path to float rounding. Shorter files, arrays and tuples take the whole-file path.
    """
    if not isinstance(item, (str, os.PathLike)):
        return split_clips(load_audio(item, sample_rate), clip_samples, max_clips)
    what = f"audio file {os.fspath(item)!r}"
    with _open_audio(Path(item), what) as f:
        clips = _read_clip_windows(f, what, sample_rate, clip_samples, max_clips)
        if clips is not None:
            return clips, torch.full((len(clips),), clip_samples)
        return split_clips(_whole_file(f, what, sample_rate), clip_samples, max_clips)


def _whole_file(f: sf.SoundFile, what: str, sample_rate: int) -> Tensor:
    """All of an open audio file as :func:`load_audio` gives it: mono, at ``sample_rate``."""
    if f.seekable():  # back to the start after a window read that came up short
        f.seek(0)
    wave = torch.from_numpy(np.ascontiguousarray(_read_frames(f, -1, what).T))  # (channels, samples)
    # a file says how many channels it has: any number is mixed down
    return _to_mono(wave, f.samplerate, what, wave.shape[0], sample_rate)


@contextmanager
def _open_audio(path: Path, what: str) -> Iterator[sf.SoundFile]:
    """A checked, open ``soundfile.SoundFile`` (nothing read yet); :class:`InputError` naming ``what`` otherwise."""
    if not path.is_file():
        raise InputError(f"{what} does not exist; expected a path to a WAV or FLAC file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); expected a WAV or FLAC file: re-export or re-download it")
    try:
        file = sf.SoundFile(path)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise _undecodable(what, err) from None
    with file:
        missing = _wav_bytes_missing(path)
        if missing:  # libsndfile reads a cut-off WAV up to the cut without a word
            raise InputError(
                f"{what} is truncated: its header promises {missing} more bytes of samples than the file holds; "
                "re-export or re-download it (`ffmpeg -i IN OUT.wav` keeps the part that is there)"
            )
        yield file


def _undecodable(what: str, err: Exception) -> InputError:
    return InputError(
        f"{what} could not be decoded ({err}); expected a WAV or FLAC file readable by libsndfile: "
        "check that it is not truncated or convert it (e.g. `ffmpeg -i IN OUT.wav`)"
    )


def _read_frames(f: sf.SoundFile, frames: int, what: str) -> np.ndarray:
    """``frames`` frames (-1: to the end) from where ``f`` stands, as float32 ``(frames, channels)``."""
    try:
        return f.read(frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise _undecodable(what, err) from None


def _check_finite(wave: Tensor, what: str) -> None:
    if not torch.isfinite(wave).all():
        raise InputError(f"{what} contains NaN or infinite samples; expected finite values")


def _resample_ratio(rate: float, sample_rate: int) -> Fraction:
    """``sample_rate / rate`` as torchaudio gets it: ``resample(wave, ratio.denominator, ratio.numerator)``."""
    # torchaudio's kernel grows with both rates divided by their gcd: 44101 -> 8000 Hz would build a 1.4 GB
    # kernel. A ratio with a denominator <= 1000 is exact for the usual rates (44100 -> 8000 is 80/441) and
    # within 0.05% (under a cent of pitch) for odd ones such as 44101.
    if round(rate) == sample_rate:
        return Fraction(1)
    return Fraction(sample_rate, int(round(rate))).limit_denominator(1000)


def _resample(wave: Tensor, rate: float, sample_rate: int) -> Tensor:
    ratio = _resample_ratio(rate, sample_rate)
    return wave if ratio == 1 else AF.resample(wave, ratio.denominator, ratio.numerator)


def _read_clip_windows(
    f: sf.SoundFile, what: str, sample_rate: int, clip_samples: int, max_clips: int
) -> Tensor | None:
    """The ``(max_clips, clip_samples)`` clips :func:`split_clips` cuts, read window by window; None: read it whole.

    Resampling turns file frames ``[m * down, ...)`` into output samples ``[m * up, ...)`` (``up / down``
    the reduced ratio), each output drawing on the input within the filter's ``width`` either side. A window
    starts and ends whole ``down``-blocks beyond that reach, so its interior outputs are those of the whole file.
    """
    ratio = _resample_ratio(f.samplerate, sample_rate)
    up, down = ratio.numerator, ratio.denominator
    length = math.ceil(up * f.frames / down)  # samples after resampling, as torchaudio computes them
    if length <= max_clips * clip_samples or not f.seekable():
        return None  # the clips cover the whole file (or it cannot seek): nothing to save
    # torchaudio's sinc kernel (lowpass_filter_width=6, rolloff=0.99) reaches this many input frames either side
    width = 0 if ratio == 1 else math.ceil(6 * down / (0.99 * min(up, down)))
    reach = math.ceil(width / down) + 1 if width else 0  # in down-blocks
    clips = []
    for start in clip_starts(length, clip_samples, max_clips):
        first_block = max(0, start // up - reach)
        last_block = (start + clip_samples - 1) // up + reach + 1
        begin, end = first_block * down, min(f.frames, (last_block + 1) * down)
        f.seek(begin)
        data = _read_frames(f, end - begin, what)
        wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (channels, frames), as load_audio reads a file
        if wave.shape[1] < end - begin:  # the header promised more than the decoder gives
            return None
        _check_finite(wave, what)
        offset = start - first_block * up
        clips.append(_resample(wave.mean(0), f.samplerate, sample_rate)[offset : offset + clip_samples])
    return torch.stack(clips)


def _wav_bytes_missing(path: Path) -> int:
    """Bytes a RIFF/WAVE file's ``data`` chunk declares beyond the end of the file (0: complete or not a WAV)."""
    with open(path, "rb") as f:
        header = f.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return 0
        size, position = os.fstat(f.fileno()).st_size, 12
        while position + 8 <= size:
            f.seek(position)
            chunk, length = f.read(4), int.from_bytes(f.read(4), "little")
            if chunk == b"data":
                # streaming writers leave the length 0 or 0xFFFFFFFF: unknown, not truncated
                return max(0, length - (size - position - 8)) if 0 < length < 0xFFFFFFFF else 0
            position += 8 + length + (length & 1)  # chunks are padded to an even length
    return 0


def _as_tensor(data: Any, what: str) -> Tensor:
    """Array or tensor -> float32 tensor; integer PCM is scaled to [-1, 1]."""
    array = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1))
    if array.dtype.kind != "f":
        raise InputError(f"{what} has dtype {array.dtype}; expected float or integer PCM samples")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def split_clips(waveform: Tensor, clip_samples: int, max_clips: int) -> tuple[Tensor, Tensor]:
    """``(samples,)`` -> clips ``(k, clip_samples)`` and the number of real (unpadded) samples in each.

    Audio of at most one clip is zero-padded at the end; longer audio gives
    ``min(max_clips, ceil(samples / clip_samples))`` evenly spaced clips from start to end.
    """
    n = waveform.shape[-1]
    if n <= clip_samples:
        return F.pad(waveform, (0, clip_samples - n))[None], torch.tensor([n])
    starts = clip_starts(n, clip_samples, max_clips)
    return torch.stack([waveform[s : s + clip_samples] for s in starts]), torch.full((len(starts),), clip_samples)


def clip_starts(num_samples: int, clip_samples: int, max_clips: int) -> list[int]:
    """First sample of each clip :func:`split_clips` cuts from ``num_samples > clip_samples`` samples."""
    k = min(max_clips, math.ceil(num_samples / clip_samples))
    return torch.linspace(0, num_samples - clip_samples, k).round().long().tolist()


@dataclass
class AudioFrontend:
    """Waveforms ``(..., samples)`` -> normalised log-mel features ``(..., n_mels, frames)``.

    ``features="logmel"``: power mel spectrogram (25 ms Hann window, 10 ms hop, centred frames) and
    ``log(mel + eps)``. ``features="fbank"``: Kaldi filter banks as ImageBind computes them (waveform
    mean removed, Hanning window, no dither, edge frames snipped). ``normalize="utterance"`` uses the
    mean and std of each clip's real frames (``valid_samples``), so padding changes neither;
    ``"utterance_bins"`` subtracts one mean per mel bin instead; ``"fixed"`` uses ``mean``/``std``
    (AudioSet fbank statistics by default).

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
        if self.features == "logmel":  # Kaldi fbank builds its own filters
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
        if self.normalize == "fixed":
            feats = (feats - self.mean) / self.std
        elif self.normalize != "none":
            feats = self._utterance_norm(feats, valid_samples)
        return feats.reshape(*waveform.shape[:-1], *feats.shape[-2:])

    def _fbank(self, wave: Tensor) -> Tensor:
        if wave.shape[-1] < self.win_length:
            wave = F.pad(wave, (0, self.win_length - wave.shape[-1]))
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


class SpectrogramEncoder(ModalityEncoder):
    """Audio encoder whose trunk takes ``(B, 1, n_mels, frames)`` features from an :class:`AudioFrontend`."""

    file_suffixes = AUDIO_SUFFIXES

    def __init__(
        self,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int,
        frontend: AudioFrontend,
        clip_seconds: float,
        max_clips: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__("audio", trunk, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        if max_clips < 1 or clip_seconds <= 0:
            raise ConfigError(f"need max_clips >= 1 and clip_seconds > 0, got {max_clips} and {clip_seconds}")
        self.frontend = frontend  # a plain object: not moved by .to(), preprocessing stays on the CPU
        self.clip_samples = round(clip_seconds * frontend.sample_rate)
        self.max_clips = max_clips

    def preprocess(self, item: Any) -> Tensor:
        """Raw audio -> ``(num_clips, 1, n_mels, frames)``."""
        clips, valid = load_audio_clips(item, self.frontend.sample_rate, self.clip_samples, self.max_clips)
        return self.frontend(clips, valid)[:, None]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_waveforms(n, seed)

    def collate(self, samples: list[Tensor]) -> Any:
        return self.collate_clips(samples)

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)


class AudioCNN(nn.Module):
    """Conv3x3-BN-ReLU blocks, width doubling and 2x2 max pooling every two blocks, global average pool."""

    def __init__(self, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        blocks, channels = [], 1
        for i in range(depth):
            out = width * 2 ** (i // 2)
            layers = [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil_mode: a 1-pixel map stays 1 pixel
            blocks.append(nn.Sequential(*layers))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.dropout(x.mean(dim=(-2, -1)))


class SpectrogramViT(nn.Module):
    """ImageBind-style audio ViT: overlapping 2-D patches, CLS token, learned positions, pre-norm blocks."""

    def __init__(
        self,
        n_mels: int,
        frames: int,
        width: int,
        depth: int,
        heads: int,
        patch_size: int,
        patch_stride: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        grid = ((n_mels - patch_size) // patch_stride + 1, (frames - patch_size) // patch_stride + 1)
        if min(n_mels, frames) < patch_size:
            raise ConfigError(
                f"spectrogram of {n_mels} mel bins x {frames} frames is smaller than patch_size={patch_size}; "
                "raise n_mels / clip_seconds or lower patch_size"
            )
        self.patch_embed = nn.Conv2d(1, width, patch_size, patch_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, int(width * mlp_ratio), dropout, "gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(self.patch_embed(x), "b d f t -> b (f t) d")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


@register_encoder("audio", tiny={"embed_dim": 16, "width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5})
def audio_cnn(
    embed_dim: int = 128,
    sample_rate: int = 8000,
    clip_seconds: float = 1.0,
    n_mels: int = 64,
    f_min: float = 50.0,
    f_max: float | None = 4000.0,
    width: int = 32,
    depth: int = 6,
    features: FeatureKind = "logmel",
    normalize: NormKind = "utterance",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
    dropout: float = 0.1,
    feature_mean: float = -4.27,
    feature_std: float = 9.14,
) -> SpectrogramEncoder:
    """2-D CNN over log-mel spectrograms of short clips (spoken words, sound events).

    Example: ``create_encoder("audio_cnn", embed_dim=64, depth=6)``. On spoken digits, 64 log-mel bins over
    50-4000 Hz at 8 kHz with ``normalize="utterance_bins"`` generalised best to an unseen speaker (recipes/digits.yaml).
    """
    frontend = AudioFrontend(sample_rate, features, n_mels, f_min, f_max, normalize, feature_mean, feature_std)
    trunk = AudioCNN(width, depth, dropout)
    return SpectrogramEncoder(
        trunk, trunk.out_dim, embed_dim, frontend, clip_seconds, max_clips, head, logit_scale, learnable_logit_scale
    )


@register_encoder(
    "audio", tiny={"embed_dim": 16, "n_mels": 32, "clip_seconds": 0.5, "width": 32, "depth": 1, "heads": 2}
)
def audio_vit(
    embed_dim: int = 128,
    sample_rate: int = 16000,
    clip_seconds: float = 2.0,
    n_mels: int = 128,
    f_min: float = 20.0,
    f_max: float | None = None,
    width: int = 384,
    depth: int = 6,
    heads: int = 6,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    patch_stride: int = 10,
    features: FeatureKind = "fbank",
    normalize: NormKind = "fixed",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
    dropout: float = 0.0,
    feature_mean: float = -4.27,
    feature_std: float = 9.14,
) -> SpectrogramEncoder:
    """ViT over Kaldi fbank patches (kernel 16, stride 10), as ImageBind's audio tower.

    Example: ``create_encoder("audio_vit", width=768, depth=12, heads=12)`` is ImageBind's size.
    """
    frontend = AudioFrontend(sample_rate, features, n_mels, f_min, f_max, normalize, feature_mean, feature_std)
    frames = frontend.num_frames(round(clip_seconds * sample_rate))
    trunk = SpectrogramViT(n_mels, frames, width, depth, heads, patch_size, patch_stride, mlp_ratio, dropout)
    return SpectrogramEncoder(
        trunk, width, embed_dim, frontend, clip_seconds, max_clips, head, logit_scale, learnable_logit_scale
    )


class ASTEncoder(ModalityEncoder):
    """A Hugging Face Audio Spectrogram Transformer with its feature extractor."""

    file_suffixes = AUDIO_SUFFIXES

    def __init__(
        self,
        model: Any,
        extractor: Any,
        embed_dim: int,
        pooling: str,
        max_clips: int,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__("audio", model, model.config.hidden_size, embed_dim, head, logit_scale, learnable_logit_scale)
        if pooling not in ("pooler", "mean"):
            raise ConfigError(f"pooling must be 'pooler' (CLS + distillation tokens) or 'mean', got {pooling!r}")
        if extractor.max_length != model.config.max_length or extractor.num_mel_bins != model.config.num_mel_bins:
            raise ConfigError(
                f"AST feature extractor makes {extractor.max_length} x {extractor.num_mel_bins} spectrograms but the "
                f"model expects {model.config.max_length} x {model.config.num_mel_bins}: save a matching extractor"
            )
        self.extractor, self.pooling, self.max_clips = extractor, pooling, max_clips
        self.sample_rate = int(extractor.sampling_rate)
        # the extractor uses Kaldi's 25 ms frames every 10 ms and keeps max_length frames
        self.win_length, hop = round(0.025 * self.sample_rate), round(0.010 * self.sample_rate)
        self.clip_samples = self.win_length + (extractor.max_length - 1) * hop

    def preprocess(self, item: Any) -> Tensor:
        """Raw audio -> ``(num_clips, max_length, num_mel_bins)``."""
        clips, valid = load_audio_clips(item, self.sample_rate, self.clip_samples, self.max_clips)
        # unpadded clips: the extractor pads the spectrogram itself, as the model was trained
        segments = [clip[: max(int(v), self.win_length)].numpy() for clip, v in zip(clips, valid, strict=True)]
        return self.extractor(segments, sampling_rate=self.sample_rate, return_tensors="pt")["input_values"]

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        return example_waveforms(n, seed)

    def collate(self, samples: list[Tensor]) -> Any:
        return self.collate_clips(samples)

    def forward_features(self, batch: Tensor) -> Tensor:
        out = self.trunk(input_values=batch)
        return out.pooler_output if self.pooling == "pooler" else out.last_hidden_state.mean(1)

    def trunk_blocks(self) -> list[nn.Module]:
        return find_blocks(self.trunk)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.extractor)


def _tiny_ast(scratch_dir: Path) -> dict[str, Any]:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    path = Path(scratch_dir) / "ast"
    if not (path / "config.json").is_file():
        config = ASTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            num_mel_bins=16,
            max_length=64,
            patch_size=8,
            frequency_stride=8,
            time_stride=8,
        )
        ASTModel(config).save_pretrained(path)
        ASTFeatureExtractor(num_mel_bins=16, max_length=64, sampling_rate=16000).save_pretrained(path)
    return {"path": str(path), "embed_dim": 16}


@register_encoder("audio", pretrained="local Hugging Face ASTModel directory", tiny=_tiny_ast)
def hf_ast(
    path: str,
    load_weights: bool = True,
    embed_dim: int = 128,
    pooling: str = "pooler",
    head: HeadKind = "linear",
    logit_scale: float = 20.0,
    learnable_logit_scale: bool = False,
    max_clips: int = 3,
) -> ASTEncoder:
    """Hugging Face Audio Spectrogram Transformer (ASTModel + ASTFeatureExtractor) from a local directory.

    Example: ``create_encoder("hf_ast", path="models/ast-finetuned-audioset")`` where the directory was
    written by ``ASTModel.save_pretrained`` and ``ASTFeatureExtractor.save_pretrained``.
    """
    from transformers import ASTFeatureExtractor, ASTModel

    model = load_hf_model(ASTModel, path, load_weights, what="hf_ast")
    extractor = load_hf_processor(ASTFeatureExtractor, path, what="hf_ast feature extractor")
    return ASTEncoder(model, extractor, embed_dim, pooling, max_clips, head, logit_scale, learnable_logit_scale)
