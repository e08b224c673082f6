"""IMU encoders: 6-axis accelerometer + gyroscope series, cut into windows, a patch-embedded transformer.

A raw IMU item is one of

- an array/tensor ``(6, T)`` at the encoder's ``sample_rate``, rows ``ax, ay, az, gx, gy, gz``: acceleration
  in m/s^2 (gravity included, as phones and Ego4D record it), angular velocity in rad/s;
- a ``(signal, sample_rate)`` tuple, resampled to the encoder's rate;
- a ``.npy`` file holding ``(6, T)``, or a ``.csv`` file with one sample per row and 6 columns in the order
  above (a header line such as ``ax,ay,az,gx,gy,gz`` is skipped; drop timestamp columns first).

The series is cut into windows of ``window_seconds`` every ``stride_seconds`` (default: no overlap); a
series shorter than a window, and the last window, are zero-padded; a long series gives up to
``max_windows`` evenly chosen windows whose embeddings are averaged (a :class:`bind.ClipBatch`, as audio).

The two sensor groups have different units, so ``normalize="fixed"`` divides accelerometer rows by
``accel_scale`` (9.81: m/s^2 -> g) and gyroscope rows by ``gyro_scale`` (rad/s); ``"window"`` standardises
each window: per-channel mean removed, divided by its group's standard deviation over the real samples (one
std per group keeps the ratio between axes, i.e. the direction of motion). Padding is 0 after normalisation.

Example::

    enc = create_encoder("imu_transformer", sample_rate=100, window_seconds=2.0, embed_dim=64)
    z = enc.embed([np.zeros((6, 500), np.float32), "walk_0001.csv"])  # (2, 64), unit norm
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from bind import ClipBatch, ConfigError, HeadKind, InputError, ModalityEncoder, find_blocks, register_encoder

from ._optional import optional
from ._transformer import pre_norm_blocks

IMUNorm = Literal["fixed", "window", "none"]
CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")
STANDARD_GRAVITY = 9.80665  # m/s^2


def load_imu(item: Any, sample_rate: int) -> Tensor:
    """One raw IMU item -> float32 ``(6, T)`` at ``sample_rate``.

    Example::

        load_imu((np.zeros((6, 400)), 200), sample_rate=100).shape   # (6, 200)
    """
    rate = sample_rate
    if isinstance(item, (str, os.PathLike)):
        what = f"IMU file {os.fspath(item)!r}"
        array: Any = _read_imu_file(Path(item), what)
    elif isinstance(item, tuple) and len(item) == 2:
        what, (array, rate) = "(signal, sample_rate) IMU item", item
        if not isinstance(rate, (int, float, np.integer, np.floating)) or not 1 <= rate < math.inf:
            raise InputError(f"{what}: sample_rate must be a positive number of Hz (at least 1), got {rate!r}")
    elif isinstance(item, (np.ndarray, Tensor)):
        what, array = f"IMU {type(item).__name__} of shape {tuple(item.shape)}", item
    else:
        raise InputError(
            f"cannot read an IMU series from a {type(item).__name__}; expected a (6, T) array or tensor, a "
            "(signal, sample_rate) tuple, or a .npy/.csv path"
        )
    if not isinstance(array, (np.ndarray, Tensor)):
        raise InputError(f"{what}: the signal must be a (6, T) array or tensor, got a {type(array).__name__}")
    signal = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array.detach().cpu())
    if signal.ndim != 2 or signal.shape[0] != 6 or signal.shape[1] == 0:
        hint = ": transpose it (.T)" if signal.ndim == 2 and signal.shape[-1] == 6 else ""
        raise InputError(
            f"{what} has shape {tuple(signal.shape)}; expected (6, T) with rows {', '.join(CHANNELS)} and T >= 1{hint}"
        )
    if signal.dtype == torch.bool or signal.is_complex():
        raise InputError(f"{what}: expected real-valued samples, got dtype {signal.dtype}")
    signal = signal.float()
    if not torch.isfinite(signal).all():
        raise InputError(f"{what} holds NaN or inf samples; expected finite values (interpolate sensor dropouts)")
    if round(rate) != sample_rate:
        ratio = Fraction(sample_rate, round(rate)).limit_denominator(1000)
        AF = optional("torchaudio.functional")

        signal = AF.resample(signal, ratio.denominator, ratio.numerator)
    return signal


def _read_imu_file(path: Path, what: str) -> np.ndarray:
    expected = f"expected a .npy file holding (6, T) or a .csv file with 6 columns ({','.join(CHANNELS)})"
    if not path.is_file():
        raise InputError(f"{what} does not exist; {expected}")
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes); {expected}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise InputError(f"{what} has an unknown extension {suffix!r}; {expected}")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with open(path) as f:
            first = f.readline()
        header = not all(_is_number(cell) for cell in first.split(","))
        table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float32)
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"{what} could not be read ({type(err).__name__}: {err}); {expected}") from err
    if table.shape[1] != 6:
        raise InputError(
            f"{what} has {table.shape[1]} columns; expected 6 ({','.join(CHANNELS)}): drop timestamp or other columns"
        )
    return table.T


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def split_windows(signal: Tensor, window: int, stride: int, max_windows: int) -> tuple[Tensor, Tensor]:
    """``(C, T)`` -> windows ``(k, C, window)`` starting every ``stride`` samples, and their real lengths ``(k,)``.

    ``ceil((T - window) / stride) + 1`` windows cover the series (one, zero-padded, when ``T <= window``; the
    last one is padded); more than ``max_windows`` are thinned to ``max_windows`` evenly spaced ones.
    """
    total = signal.shape[-1]
    count = 1 if total <= window else math.ceil((total - window) / stride) + 1
    starts = [i * stride for i in range(count)]
    if count > max_windows:
        starts = [starts[i] for i in torch.linspace(0, count - 1, max_windows).round().long().tolist()]
    windows = torch.stack([F.pad(signal[:, s : s + window], (0, max(0, s + window - total))) for s in starts])
    return windows, torch.tensor([min(window, total - s) for s in starts])


def normalize_windows(
    windows: Tensor, valid: Tensor, normalize: IMUNorm, accel_scale: float, gyro_scale: float
) -> Tensor:
    """``(k, 6, window)`` -> normalised, padding (past ``valid[i]`` samples) set to 0."""
    mask = (torch.arange(windows.shape[-1])[None] < valid[:, None])[:, None]  # (k, 1, window)
    if normalize == "fixed":
        scale = windows.new_tensor([accel_scale] * 3 + [gyro_scale] * 3)[:, None]
        windows = windows / scale
    elif normalize == "window":
        count = valid[:, None, None].float()
        mean = (windows * mask).sum(-1, keepdim=True) / count
        centred = (windows - mean) * mask
        groups = rearrange(centred, "k (g c) t -> k g (c t)", g=2)  # accelerometer, gyroscope
        std = (groups.pow(2).sum(-1) / (3 * count[:, :, 0])).sqrt().clamp_min(1e-6)  # (k, 2)
        windows = centred / std.repeat_interleave(3, dim=1)[..., None]
    elif normalize != "none":
        raise ConfigError(f"IMU normalize must be 'fixed', 'window' or 'none', got {normalize!r}")
    return windows * mask


class IMUTransformer(nn.Module):
    """1-D patches (Conv1d, kernel = stride = ``patch_size``) over the 6 channels, learned positions, pre-norm
    transformer blocks, mean over tokens. ImageBind's IMU tower is this with 2000-sample windows, patch 8, width 512.
    """

    def __init__(
        self, window: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        if window % patch_size:
            raise ConfigError(
                f"an IMU window of {window} samples is not a multiple of patch_size={patch_size}; "
                "change window_seconds, sample_rate or patch_size"
            )
        self.patch_embed = nn.Conv1d(len(CHANNELS), width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, window // patch_size, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = pre_norm_blocks(width, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(self.patch_embed(x), "b d n -> b n d") + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(1)


class IMUEncoder(ModalityEncoder):
    """IMU series -> normalised windows ``(num_windows, 6, window)`` -> a trunk on ``(B, 6, window)``."""

    file_suffixes = (".npy", ".csv")

    def __init__(
        self,
        trunk: nn.Module,
        trunk_dim: int,
        embed_dim: int,
        *,
        sample_rate: int,
        window_seconds: float,
        stride_seconds: float | None,
        max_windows: int,
        normalize: IMUNorm,
        accel_scale: float,
        gyro_scale: float,
        head: HeadKind,
        logit_scale: float,
        learnable_logit_scale: bool,
    ) -> None:
        super().__init__("imu", trunk, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        self.sample_rate, self.window = sample_rate, round(window_seconds * sample_rate)
        self.stride = self.window if stride_seconds is None else round(stride_seconds * sample_rate)
        if sample_rate < 1 or self.window < 1 or self.stride < 1 or max_windows < 1:
            raise ConfigError(
                f"need sample_rate >= 1 and window_seconds, stride_seconds giving >= 1 sample, max_windows >= 1; got "
                f"sample_rate={sample_rate}, window_seconds={window_seconds}, stride_seconds={stride_seconds}, "
                f"max_windows={max_windows}"
            )
        if normalize not in ("fixed", "window", "none"):
            raise ConfigError(f"IMU normalize must be 'fixed', 'window' or 'none', got {normalize!r}")
        if accel_scale <= 0 or gyro_scale <= 0:
            raise ConfigError(f"accel_scale and gyro_scale must be > 0, got {accel_scale} and {gyro_scale}")
        self.max_windows, self.normalize = max_windows, normalize
        self.accel_scale, self.gyro_scale = accel_scale, gyro_scale
        self.blocks = find_blocks(trunk)  # a plain list: the modules stay registered once, under trunk

    def preprocess(self, item: Any) -> Tensor:
        """Raw IMU item -> ``(num_windows, 6, window)``."""
        windows, valid = split_windows(load_imu(item, self.sample_rate), self.window, self.stride, self.max_windows)
        return normalize_windows(windows, valid, self.normalize, self.accel_scale, self.gyro_scale)

    def example_inputs(self, n: int, seed: int = 0) -> list[np.ndarray]:
        """``n`` float32 ``(6, 50)`` series of standard normal noise."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((6, 50)).astype(np.float32) for _ in range(n)]

    def collate(self, samples: list[Tensor]) -> ClipBatch:
        return self.collate_clips(samples)

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)


# 32-sample windows: the 50-sample test series gives two windows, so the ClipBatch path is exercised
_TINY = {
    "embed_dim": 16,
    "sample_rate": 50,
    "window_seconds": 0.64,
    "patch_size": 8,
    "width": 16,
    "depth": 1,
    "heads": 2,
}


@register_encoder("imu", tiny=_TINY)
def imu_transformer(
    embed_dim: int = 128,
    sample_rate: int = 100,
    window_seconds: float = 2.0,
    stride_seconds: float | None = None,
    max_windows: int = 4,
    normalize: IMUNorm = "fixed",
    accel_scale: float = STANDARD_GRAVITY,
    gyro_scale: float = 1.0,
    patch_size: int = 10,
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    dropout: float = 0.1,
    head: HeadKind = "linear",
    logit_scale: float = 5.0,
    learnable_logit_scale: bool = False,
) -> IMUEncoder:
    """Patch-embedded transformer over 6-axis IMU windows (ImageBind's IMU tower, small), from scratch.

    ``stride_seconds`` below ``window_seconds`` overlaps windows. ImageBind keeps IMU's logit scale fixed at 5.

    Example::

        enc = create_encoder("imu_transformer", sample_rate=200, window_seconds=5.0, patch_size=8, width=512)
    """
    window = round(window_seconds * sample_rate)
    trunk = IMUTransformer(max(window, 1), patch_size, width, depth, heads, mlp_ratio, dropout)
    return IMUEncoder(
        trunk,
        width,
        embed_dim,
        sample_rate=sample_rate,
        window_seconds=window_seconds,
        stride_seconds=stride_seconds,
        max_windows=max_windows,
        normalize=normalize,
        accel_scale=accel_scale,
        gyro_scale=gyro_scale,
        head=head,
        logit_scale=logit_scale,
        learnable_logit_scale=learnable_logit_scale,
    )
