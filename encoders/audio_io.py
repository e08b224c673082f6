"""Reading audio for the audio encoders: files, shard bytes, tuples and arrays -> mono waveforms, then clips.

A raw audio item is a path to a WAV/FLAC file (anything libsndfile decodes: :data:`AUDIO_SUFFIXES`), a
``(waveform, sample_rate)`` tuple, or a 1-D ``(samples,)`` / 2-D ``(channels, samples)`` array or tensor already at
the encoder's sample rate. :func:`load_audio` mixes it down to mono and resamples it; :func:`split_clips` cuts clips
of ``clip_samples``: a long recording gives up to ``max_clips`` evenly spaced clips, a short one is zero-padded.
:func:`load_audio_clips` does both, reading from a long file only the clips it keeps.

Importing this module registers :func:`decode_audio_bytes`, the shard decoder for those suffixes.

Example::

    clips, valid = load_audio_clips("recordings/7_jackson_0.wav", 8000, clip_samples=8000, max_clips=3)
    clips.shape   # (k, 8000), k <= 3; valid: the real (unpadded) samples of each clip
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bind import InputError, register_decoder

from ._optional import optional

if TYPE_CHECKING:
    import soundfile as sf

MAX_CHANNELS = 16  # more "channels" than this means a (samples, channels) array was passed


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")  # what libsndfile decodes


def example_waveforms(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` quiet noise waveforms (float32, at the encoder's rate) of 4000, 5000, ... samples: clips and padding."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(4000 + 1000 * i).astype(np.float32) * 0.1 for i in range(n)]


def load_audio(item: Any, sample_rate: int, mono: bool = True) -> Tensor:
    """Raw audio item -> mono float32 waveform ``(samples,)`` at ``sample_rate`` (``mono=False``: every channel
    kept, ``(channels, samples)``).

    A file is read whole: :func:`load_audio_clips` reads only the clips an encoder uses.

    Example::

        load_audio("stereo_44k.wav", 8000).shape   # (round(seconds * 8000),): mono, resampled
    """
    if isinstance(item, (str, os.PathLike)):
        what = f"audio file {os.fspath(item)!r}"
        with _open_audio(Path(item), what) as f:
            return _whole_file(f, what, sample_rate, mono)
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
    return _checked(wave, rate, what, MAX_CHANNELS, sample_rate, mono)


def _checked(wave: Tensor, rate: float, what: str, max_channels: int, sample_rate: int, mono: bool = True) -> Tensor:
    """``(samples,)`` or ``(channels, samples)`` at ``rate`` -> checked ``(samples,)`` mixed down (``mono``) or
    ``(channels, samples)``, at ``sample_rate``."""
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
    return _resample(wave.mean(0) if mono else wave, rate, sample_rate)


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


def _whole_file(f: sf.SoundFile, what: str, sample_rate: int, mono: bool = True) -> Tensor:
    """All of an open audio file as :func:`load_audio` gives it: mono (or every channel), at ``sample_rate``."""
    if f.seekable():  # back to the start after a window read that came up short
        f.seek(0)
    wave = torch.from_numpy(np.ascontiguousarray(_read_frames(f, -1, what).T))  # (channels, samples)
    # a file says how many channels it has: any number is mixed down
    return _checked(wave, f.samplerate, what, wave.shape[0], sample_rate, mono)


@contextmanager
def _open_audio(path: Path, what: str) -> Iterator[sf.SoundFile]:
    """A checked, open ``soundfile.SoundFile`` (nothing read yet); :class:`InputError` naming ``what`` otherwise."""
    if not path.is_file():
        raise InputError(f"{what} does not exist; expected a path to a WAV or FLAC file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); expected a WAV or FLAC file: re-export or re-download it")
    import soundfile as sf

    try:
        file = sf.SoundFile(path)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise _undecodable(what, err) from None
    with file:
        with open(path, "rb") as raw:
            missing = wav_bytes_missing(raw)
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
    import soundfile as sf

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
    if ratio == 1:
        return wave
    AF = optional("torchaudio.functional")

    return AF.resample(wave, ratio.denominator, ratio.numerator)


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


def wav_bytes_missing(f: BinaryIO) -> int:
    """Bytes a RIFF/WAVE file's ``data`` chunk declares beyond its end (0: complete or not a WAV).

    libsndfile reads a cut-off WAV up to the cut without a word; this reads the chunk headers only."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    header = f.read(12)
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return 0
    position = 12
    while position + 8 <= size:
        f.seek(position)
        chunk, length = f.read(4), int.from_bytes(f.read(4), "little")
        if chunk == b"data":
            # streaming writers leave the length 0 or 0xFFFFFFFF: unknown, not truncated
            return max(0, length - (size - position - 8)) if 0 < length < 0xFFFFFFFF else 0
        position += 8 + length + (length & 1)  # chunks are padded to an even length
    return 0


@register_decoder(*(suffix[1:] for suffix in AUDIO_SUFFIXES))
def decode_audio_bytes(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """A shard member's audio bytes -> ``(waveform, sample_rate)``, the layout :func:`load_audio` takes."""
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (samples, channels)
    missing = wav_bytes_missing(io.BytesIO(data))
    if missing:
        raise ValueError(f"truncated WAV: its header promises {missing} more bytes of samples")
    return (wave[:, 0] if wave.shape[1] == 1 else np.ascontiguousarray(wave.T)), rate


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
