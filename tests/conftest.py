"""Shared fixtures: raw example inputs per modality, and the real data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA_ROOT = Path(os.environ.get("BINDKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"

SMOKE = [
    "num_workers=0",
    "embed_dim=16",
    "modalities.image.args.width=4",
    "modalities.audio.args.width=4",
    "modalities.audio.args.depth=2",
    "modalities.video.args.frame_encoder_kwargs.width=4",
    "modalities.image.train_data.args.limit=256",
    "modalities.audio.train_data.args.limit=64",
    "modalities.video.train_data.args.limit=64",
    "eval.max_items=40",
    "stages.0.epochs=null",
    "stages.0.steps=2",
    "stages.0.batch_size=64",
    "stages.1.epochs=null",
    "stages.1.steps=2",
    "stages.1.batch_size=32",
    "stages.2.steps=3",
    "stages.2.pairs.audio.batch_size=16",
    "stages.2.pairs.video.batch_size=8",
    "stages.2.pairs.text.batch_size=16",
]

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config) -> None:
    """A broken install (torchaudio built for another torch) is one clear line, not a collection error per file."""
    from bind.errors import ConfigError
    from bind.registry import import_builtin_encoders

    try:
        import_builtin_encoders()
    except ConfigError as err:
        raise pytest.UsageError(str(err)) from None


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A smoke-size run of the digits recipe (seconds), trained once per test session."""
    from bind.recipe import load_recipe
    from bind.trainer import run_recipe

    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    out = tmp_path_factory.mktemp("run")
    run_recipe(load_recipe(DIGITS, [*SMOKE, f"data_root={DATA_ROOT}"]), out, show_progress=False)
    return out
