"""CUDA paths (bf16 autocast, pinned memory); skipped on machines without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import DIGITS, SMOKE

from bind.losses import info_nce
from bind.recipe import load_recipe
from bind.trainer import run_recipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_info_nce_under_bf16_autocast_matches_float32():
    a = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = info_nce(a, b, 20.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(a, b, 20.0).item(), abs=1e-5)


def test_smoke_digits_run_on_cuda(tmp_path, data_root):
    recipe = load_recipe(DIGITS, [*SMOKE, f"data_root={data_root}", "device=cuda"])
    results = run_recipe(recipe, tmp_path, show_progress=False)
    assert all(math.isfinite(r["accuracy"]) for r in results["zero_shot"].values())
