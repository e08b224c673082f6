"""Shared fixtures: raw example inputs per modality, and the real data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA_ROOT = Path(os.environ.get("BINDKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def raw_examples(modality: str, n: int = 3, seed: int = 0) -> list:
    """``n`` raw items of a built-in modality, as a user would pass them to ``embed``."""
    rng = np.random.default_rng(seed)
    if modality == "image":
        return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]
    if modality == "text":
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        return [f"a handwritten {words[i % 10]}" + " digit" * i for i in range(n)]
    if modality == "audio":
        return [rng.standard_normal(4000 + 1000 * i).astype(np.float32) * 0.1 for i in range(n)]
    if modality == "video":
        return [rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8) for _ in range(n)]
    if modality == "depth":  # metres
        return [rng.uniform(0.5, 8.0, (24, 32 + 4 * i)).astype(np.float32) for i in range(n)]
    if modality == "thermal":  # raw 16-bit counts
        return [rng.integers(7000, 9000, (24, 32 + 4 * i), dtype=np.uint16) for i in range(n)]
    if modality == "imu":
        return [rng.standard_normal((6, 50)).astype(np.float32) for _ in range(n)]
    raise KeyError(modality)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    return DATA_ROOT
