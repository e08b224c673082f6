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


# ---- what a first GPU run needs (issue: ready for the first GPU run) ------------------------------------------
def _cuda_syncs(fn):
    """``fn()``, and the messages of the synchronizing CUDA calls it made (torch's sync debug mode warns on each:
    ``.item()``, a device-to-host copy, a ``nonzero``, a copy from pageable memory)."""
    import warnings

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return out, [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("compile_backend", [False, True], ids=["eager", "compiled"])
def test_the_trainers_step_on_cuda_in_bf16_reads_one_value_per_step(data_root, compile_backend):
    """The real step (pinned loaders, cached MiniLM features gathered into pinned memory, GradCache chunks of audio
    clips, AdamW) compiled or not: one host sync per step, finite losses, the cache on the host in bf16."""
    from test_host_syncs import two_pair_runner

    keys = {"precision": "bf16", "compile": compile_backend}
    runner = two_pair_runner(data_root, "cuda", keys, chunk_size=4)
    cache = runner.caches["text"]
    assert cache.features.device.type == "cpu" and cache.features.dtype == torch.bfloat16
    iterators = runner.data.iterators()
    for _ in range(3):  # compiling happens here
        runner.train_step(iterators)
    # the next batches read (and pinned) first, as the CPU test does: what is counted is the step's own work
    batches = [{m: next(it) for m, it in iterators.items()} for _ in range(3)]
    ready = {m: iter([b[m] for b in batches]) for m in iterators}
    syncs = []
    for _ in range(3):
        result, messages = _cuda_syncs(lambda: runner.train_step(ready))
        syncs.append(messages)
    loss, parts, grad_norm = result.scalars()
    assert math.isfinite(loss) and math.isfinite(grad_norm) and result.stepped
    assert [len(m) for m in syncs] == [1, 1, 1], syncs  # whether to update; nothing else waits for the GPU


def test_an_nccl_group_of_one_gives_the_steps_gradients_of_no_group(data_root, tmp_path):
    """World size 1 still runs every collective (the reducer's buckets, gather_with_grad, the batch-norm sync,
    the cache exchange) through NCCL: the gradients equal those of the same step without a process group."""
    import torch.distributed as dist
    from test_host_syncs import two_pair_runner

    from bind.distributed import sync_batchnorm_stats
    from bind.train.feature_cache import concat_over_ranks

    def grads(runner):
        batches = {m: next(it) for m, it in runner.data.iterators().items()}
        runner.backward({m: iter([b]) for m, b in batches.items()})
        return {i: p.grad.clone() for i, p in enumerate(runner.params) if p.grad is not None}

    alone = grads(two_pair_runner(data_root, "cuda", {"precision": "fp32"}))
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        runner = two_pair_runner(data_root, "cuda", {"precision": "fp32"})
        assert runner.reducer.buckets  # the collectives run
        grouped = grads(runner)
        sync_batchnorm_stats(runner.model)
        rows = torch.randn(1000, 7)
        joined, counts = concat_over_ranks(rows, torch.device("cuda"), chunk_bytes=4096)
        assert torch.equal(joined, rows) and counts == [1000]
    finally:
        dist.destroy_process_group()
    assert alone.keys() == grouped.keys()
    for key in alone:
        torch.testing.assert_close(grouped[key], alone[key], atol=1e-5, rtol=1e-4)


def test_a_run_with_dropout_resumed_on_cuda_ends_where_the_whole_run_does(tmp_path, data_root):
    """Checkpoints keep the CUDA generator's state: a run resumed from its step-2 checkpoint draws the same
    dropout masks (to CUDA's atomic-add rounding, which is not bitwise reproducible)."""
    import shutil

    from safetensors.torch import load_file

    from bind.bench.ddp import check_recipe
    from bind.recipe import parse_recipe
    from bind.train.checkpoint import list_checkpoints

    data = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    data["modalities"]["audio"]["args"]["dropout"] = 0.5
    data |= {"device": "cuda", "checkpoint_every": 1, "keep_checkpoints": 10}
    data["stages"][0]["steps"] = 4
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_recipe(parse_recipe(dict(data)), whole, show_progress=False)
    shutil.copytree(whole, resumed)
    (resumed / "model.safetensors").unlink()
    for checkpoint in list_checkpoints(resumed / "checkpoints"):
        if checkpoint.step > 2:
            shutil.rmtree(checkpoint.path)
    assert "cuda" in load_file(str(list_checkpoints(resumed / "checkpoints")[-1].path / "rng.safetensors"))
    run_recipe(parse_recipe(dict(data)), resumed, show_progress=False, resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3, msg=key)


def test_gradcache_with_dropout_on_cuda_replays_the_masks_of_its_first_pass():
    """The replay restores the CUDA generator before each chunk: the same masks, so the same embeddings; and it
    leaves the generator where the first pass left it."""
    from bind.train.gradcache import ChunkedEmbedding

    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 16)).cuda()
    x = torch.randn(64, 32, device="cuda")
    replayed = []
    tower.register_forward_hook(
        lambda module, inputs, out: replayed.append(out.detach().clone()) if out.requires_grad else None
    )
    chunked = ChunkedEmbedding(tower, x, 16, "cuda")
    after_first_pass = torch.cuda.get_rng_state()
    (chunked.embeddings.square().sum()).backward()
    chunked.backward()
    assert torch.equal(torch.cat(replayed), chunked.embeddings.detach())  # identical masks
    assert torch.equal(torch.cuda.get_rng_state(), after_first_pass)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_a_conv3d_tower_trains_with_channels_last_on_cuda_in_bf16():
    import copy

    from bind import create_encoder
    from bind.train.compile import input_channels_last, to_channels_last
    from encoders.imagebind import tiny_config

    torch.manual_seed(0)
    encoder = create_encoder("imagebind_image", config=tiny_config("vision")).cuda().train()
    batch = encoder.collate([encoder.preprocess(x) for x in encoder.example_inputs(4)]).cuda()
    reference = copy.deepcopy(encoder)
    to_channels_last(encoder)  # raised "required rank 4 tensor" when the trainer converted the whole model
    assert encoder.trunk.patch_embed.weight.is_contiguous()  # the Conv3d stem is left as it is
    outs = []
    for tower, given in ((reference, batch), (encoder, input_channels_last(batch))):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = tower(given)
        # a fixed projection: the embeddings are unit norm, so their square sum would have no gradient to compare
        target = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).cuda()
        (z.float() * target).sum().backward()
        outs.append((z.float(), tower.trunk.patch_embed.weight.grad.float()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=3e-2, rtol=5e-2)
