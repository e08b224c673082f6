"""Feature caches live on the host in the training dtype, give the uncached embeddings under autocast, and
are built in shards over ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import spawn_gloo

from bind import create_encoder
from bind.data import Items
from bind.distributed import Dist
from bind.train import feature_cache
from bind.train.feature_cache import FeatureCache, shard_of

CPU = torch.device("cpu")
DIGITS = ("digits_cnn", {"width": 4, "embed_dim": 16})
AUDIO = ("audio_cnn", {"width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5, "embed_dim": 16})


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def encoder(spec: tuple[str, dict], **extra):
    torch.manual_seed(0)
    return create_encoder(spec[0], **spec[1], **extra).freeze("trunk")


class Source:
    """Raw items made from a seed (images, or waves of 1 to 4 half-second clips); ``bad`` ones fail to read."""

    def __init__(self, kind: str, n: int, bad: tuple[int, ...] = ()) -> None:
        rng = np.random.default_rng(0)
        if kind == "digits_cnn":
            self.raw = [rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in range(n)]
        else:
            self.raw = [rng.standard_normal(3000 + 3000 * (i % 4)).astype(np.float32) for i in range(n)]
        self.bad = bad

    def __call__(self, i: int):
        if i in self.bad:
            raise ValueError(f"item {i} is unreadable")
        return self.raw[i]

    def items(self) -> Items:
        return Items(self, [i % 3 for i in range(len(self.raw))], [f"x/{i}" for i in range(len(self.raw))])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_features_live_on_the_host_in_the_training_dtype_also_after_a_disk_round_trip(tmp_path, dtype):
    enc = encoder(DIGITS)
    source = Source("digits_cnn", 10)
    memory = FeatureCache.build(enc, source.items(), CPU, dtype=dtype, batch_size=4)
    disk = FeatureCache.build(enc, source.items(), CPU, tmp_path, dtype=dtype, batch_size=4)
    again = FeatureCache.build(enc, source.items(), CPU, tmp_path, dtype=dtype, batch_size=4)  # mapped, not computed
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "meta.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    enc.eval()
    with torch.no_grad():
        expected = enc.forward_features(enc.collate([enc.preprocess(x) for x in source.raw])).to(dtype)
    for cache in (memory, disk, again):
        assert cache.features.device == CPU and cache.features.dtype == dtype
        assert torch.equal(cache.features, expected)  # every row, in item order, to the bit
        rows, item_index, n = cache.gather(torch.tensor([7, 2]))
        assert rows.dtype == dtype and item_index is None and n == 2
        assert torch.equal(rows, expected[[7, 2]])


def test_a_cache_of_another_dtype_is_another_folder_and_an_identity_head_keeps_float32(tmp_path):
    enc = encoder(DIGITS)
    source = Source("digits_cnn", 6)
    items = source.items()
    FeatureCache.build(enc, items, CPU, tmp_path, dtype=torch.float32)
    bf16 = FeatureCache.build(enc, items, CPU, tmp_path, dtype=torch.bfloat16)
    assert bf16.features.dtype == torch.bfloat16  # not the float32 folder read back
    FeatureCache.build(enc, items, CPU, tmp_path, dtype=torch.bfloat16, autocast=bf16_autocast)
    assert len(list(tmp_path.iterdir())) == 3  # features computed under autocast are other features

    identity = encoder(DIGITS, head="identity")  # features go straight to normalize, in float32
    cache = FeatureCache.build(identity, items, CPU, dtype=torch.bfloat16, autocast=bf16_autocast)
    assert cache.features.dtype == torch.float32
    identity.eval()
    with torch.no_grad(), bf16_autocast():
        expected = identity.forward_features(identity.collate([identity.preprocess(x) for x in source.raw])).float()
    assert torch.equal(cache.features, expected)


@pytest.mark.parametrize("spec", [DIGITS, AUDIO], ids=["single_clip", "multi_clip"])
def test_cached_embeddings_equal_the_uncached_ones_under_bf16_autocast(spec):
    enc = encoder(spec)
    source = Source(spec[0], 24)
    items = source.items()
    cache = FeatureCache.build(enc, items, CPU, dtype=torch.bfloat16, autocast=bf16_autocast, batch_size=8)
    # what the cache held before: float32 features computed without autocast
    old = FeatureCache.compute(enc, items, CPU, batch_size=8)
    enc.eval()
    indices = torch.tensor([17, 3, 9, 0, 22, 5, 11])
    with torch.no_grad():
        batch = enc.collate(enc.preprocess_many([source.raw[i] for i in indices]))  # as the loaders do
    with torch.no_grad(), bf16_autocast():
        uncached = enc(batch)
        cached = enc.embed_features(*cache.gather(indices))
        before = enc.embed_features(*old.gather(indices))
    assert torch.equal(cached, uncached)
    assert not torch.equal(before, uncached)  # the old cache fails this test


def test_shards_are_contiguous_whole_batches_covering_every_item_once():
    for n, world, batch in [(22, 2, 4), (10, 3, 3), (5, 4, 4), (0, 2, 8)]:
        shards = [shard_of(n, Dist(rank, world), batch) for rank in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert all(s.start % batch == 0 for s in shards if len(s))
        sizes = [-(-len(s) // batch) for s in shards]  # batches per rank
        assert max(sizes) - min(sizes) <= 1


# ---- two gloo processes --------------------------------------------------------------------------------------
CASES = {  # name: (encoder, items, bad items, batch size, dtype, autocast)
    "digits": (DIGITS, 22, (3, 11, 15), 4, torch.bfloat16, True),  # 11: the last of rank 0's shard
    "audio": (AUDIO, 10, (), 3, torch.float32, False),
}


def build_case(name: str, cache_dir: Path | None, dist: Dist, state: dict | None = None, counted: list | None = None):
    spec, n, bad, batch_size, dtype, autocast = CASES[name]
    enc = encoder(spec)
    if state is not None:
        enc.load_state_dict(state)
    if counted is not None:  # count the clips this process runs through the trunk
        forward_features = enc.forward_features

        def counting(x):
            out = forward_features(x)
            counted.append(len(out))
            return out

        enc.forward_features = counting
    items = Source(spec[0], n, bad).items()
    kwargs = {"dtype": dtype, "autocast": bf16_autocast if autocast else None, "batch_size": batch_size}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return FeatureCache.build(enc, items, CPU, cache_dir, dist=dist, **kwargs)


def _worker(rank: int, dist: Dist, states: dict, tmp: str) -> None:
    feature_cache.CHUNK_BYTES = 100  # several broadcasts per rank, the last one partial
    results = {}
    for name in CASES:
        for where in ("memory", "disk", "disk again"):
            counted: list[int] = []
            cache_dir = None if where == "memory" else Path(tmp) / "cache"
            cache = build_case(name, cache_dir, dist, states[name], counted)
            results[name, where] = (cache.features.clone(), cache.counts.clone(), cache.bad, sum(counted))
    torch.save(results, Path(tmp) / f"rank{rank}.pt")


def test_two_gloo_processes_build_the_single_process_cache_each_computing_its_shard(tmp_path):
    single = {name: build_case(name, None, Dist()) for name in CASES}
    states = {name: encoder(CASES[name][0]).state_dict() for name in CASES}
    spawn_gloo(_worker, states, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert single["digits"].bad == [(f"x/{i}", f"item {i} is unreadable") for i in (3, 11, 15)]
    assert not single["audio"].single_clip  # several clips per item: counts and offsets are exchanged too
    for name, reference in single.items():
        batch_size = CASES[name][3]
        for rank, results in enumerate(ranks):
            shard = shard_of(len(reference), Dist(rank, 2), batch_size)
            assert 0 < len(shard) < len(reference)
            for where in ("memory", "disk", "disk again"):
                features, counts, bad, computed = results[name, where]
                assert features.dtype == reference.features.dtype
                assert torch.equal(features, reference.features), (name, rank, where)
                assert torch.equal(counts, reference.counts), (name, rank, where)
                assert bad == reference.bad, (name, rank, where)
                # each rank ran the trunk over its own shard's clips only; a cache on disk is not recomputed
                expected = int(reference.counts[shard.start : shard.stop].sum()) if where != "disk again" else 0
                assert computed == expected, (name, rank, where)
