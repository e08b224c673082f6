"""``bindkit bench gradcache``: peak memory and time of GradCache chunks against plain training.

A binding step as the trainer runs it: a trainable ViT tower (registry ``tv_vit_b_16`` at a small
size, 65 tokens) against the frozen anchor's embeddings, InfoNCE, backward. Figures:

* ``peak_mem_ratio``: peak memory of batch 4096 in chunks of 128 over plain batch 256 (target <= 1.3);
  ``plain_mem_growth`` shows plain training's memory doubling with the batch;
* ``time_overhead``: time per sample chunked (batch 4096) over plain (batch 256) (target <= 1.5);
* ``max_grad_diff``: largest gradient difference between chunked and plain on the same batch.

Memory is :class:`bind.bench.PeakMemory` (tensor bytes alive at once; on CUDA the allocator's
peak), measured in a separate pass from the timings so that counting does not slow them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..losses import info_nce
from ..registry import create_encoder
from ..train.gradcache import ChunkedEmbedding
from . import PeakMemory


def _step(tower: torch.nn.Module, images: torch.Tensor, anchor: torch.Tensor, chunk_size: int | None) -> float:
    if chunk_size:
        chunked = ChunkedEmbedding(tower, images, chunk_size, images.device)
        loss = info_nce(chunked.embeddings, anchor, tower.logit_scale)
        loss.backward()
        chunked.backward()
    else:
        loss = info_nce(tower(images), anchor, tower.logit_scale)
        loss.backward()
    return loss.item()


def _measure(tower, images, anchor, chunk_size, device) -> tuple[float, float]:
    """(peak bytes, seconds) of one step; gradients cleared before each pass."""
    tower.zero_grad(set_to_none=True)
    with PeakMemory(device) as mem:
        _step(tower, images, anchor, chunk_size)
    tower.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _step(tower, images, anchor, chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return mem.peak_bytes, time.perf_counter() - start


def bench_gradcache(
    batch_size: int = 4096,
    plain_batch_size: int = 256,
    chunk_size: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_dim: int = 192,
    num_layers: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tower = create_encoder(
        "tv_vit_b_16",
        embed_dim=128,
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=hidden_dim // 64,
        hidden_dim=hidden_dim,
        mlp_dim=4 * hidden_dim,
    ).to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    anchor = F.normalize(torch.randn(batch_size, 128, device=device), dim=-1)  # the frozen anchor's embeddings

    _step(tower, images[:chunk_size], anchor[:chunk_size], None)  # warm-up: allocator, kernels
    plain = {n: _measure(tower, images[:n], anchor[:n], None, device) for n in (plain_batch_size, 2 * plain_batch_size)}
    chunked_mem, chunked_s = _measure(tower, images, anchor, chunk_size, device)

    # correctness at the plain batch: one forward against chunks (the ViT has no dropout, so any seed)
    n = plain_batch_size
    tower.zero_grad(set_to_none=True)
    _step(tower, images[:n], anchor[:n], None)
    expected = [p.grad.clone() for p in tower.parameters() if p.grad is not None]
    tower.zero_grad(set_to_none=True)
    _step(tower, images[:n], anchor[:n], chunk_size)
    got = [p.grad for p in tower.parameters() if p.grad is not None]
    max_grad_diff = max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))

    plain_mem, plain_s = plain[plain_batch_size]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tower": f"ViT {num_layers}x{hidden_dim}, {(image_size // patch_size) ** 2 + 1} tokens",
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "plain_batch_size": plain_batch_size,
        "peak_mem_mb_plain": plain_mem / 2**20,
        "peak_mem_mb_plain_2x": plain[2 * plain_batch_size][0] / 2**20,
        "peak_mem_mb_chunked": chunked_mem / 2**20,
        "peak_mem_ratio": chunked_mem / plain_mem,  # target <= 1.3
        "plain_mem_growth": plain[2 * plain_batch_size][0] / plain_mem,  # ~2: plain memory grows with the batch
        "ms_per_sample_plain": 1e3 * plain_s / plain_batch_size,
        "ms_per_sample_chunked": 1e3 * chunked_s / batch_size,
        "time_overhead": (chunked_s / batch_size) / (plain_s / plain_batch_size),  # target <= 1.5
        "max_grad_diff": max_grad_diff,
    }
