"""CUDA paths (bf16 autocast, pinned memory); skipped on machines without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DIGITS, SMOKE

from bind.losses import info_nce
from bind.recipe import load_recipe
from bind.train.trainer import run_recipe

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


def test_smoke_run_with_channels_last_compile_and_gradcache_on_cuda(tmp_path, data_root):
    overrides = [*SMOKE, f"data_root={data_root}", "device=cuda", "channels_last=true", "compile=true"]
    overrides += ["stages.2.chunk_size=4"]
    recipe = load_recipe(DIGITS, overrides)
    results = run_recipe(recipe, tmp_path, show_progress=False)
    assert all(math.isfinite(r["accuracy"]) for r in results["zero_shot"].values())


def test_gradcache_under_bf16_autocast_matches_the_whole_batch_on_cuda():
    from bind.train.gradcache import ChunkedEmbedding

    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).cuda()
    x, y = torch.randn(64, 32, device="cuda"), torch.nn.functional.normalize(torch.randn(64, 16, device="cuda"), dim=-1)

    def embed(batch):
        return torch.nn.functional.normalize(tower(batch), dim=-1)

    with torch.autocast("cuda", dtype=torch.bfloat16):
        info_nce(embed(x), y, 10.0).backward()
    expected = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    chunked = ChunkedEmbedding(embed, x, 16, "cuda", lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    info_nce(chunked.embeddings, y, 10.0).backward()
    chunked.backward()
    for got, want in zip((p.grad for p in tower.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # bf16 rounding differs per chunk


def test_peak_memory_on_cuda_grows_with_the_batch():
    from bind.bench import PeakMemory

    layer = torch.nn.Linear(1024, 1024).cuda()
    peaks = []
    for n in (256, 1024):
        x = torch.randn(n, 1024, device="cuda")
        with PeakMemory("cuda") as mem:
            layer(x).relu().sum().backward()
        peaks.append(mem.peak_bytes)
    assert peaks[1] > 2 * peaks[0] > 0
