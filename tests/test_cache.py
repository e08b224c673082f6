"""Cached trunk features give the embeddings a full forward pass gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bind import create_encoder
from bind.data import Items
from bind.errors import DataError
from bind.train.feature_cache import FeatureCache, cache_key


def test_cached_features_match_forward_for_multi_clip_items():
    torch.manual_seed(0)
    enc = create_encoder("audio_cnn", embed_dim=16, width=4, depth=2, n_mels=16, clip_seconds=0.5).freeze("trunk")
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (3000, 9000, 4000, 12000)]  # 1, 3, 1, 3 clips
    items = Items(waves, [0, 1, 2, 3])
    cache = FeatureCache.compute(enc, items, torch.device("cpu"), batch_size=3)
    assert cache.counts.tolist() == [1, 3, 1, 3]
    enc.eval()
    indices = torch.tensor([3, 0, 1])
    expected = enc(enc.collate([enc.preprocess(waves[i]) for i in indices]))
    torch.testing.assert_close(enc.embed_features(*cache.gather(indices)), expected, atol=1e-5, rtol=1e-4)


def test_a_training_trunk_is_not_cached():
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    with pytest.raises(ValueError, match="trunk trains"):
        FeatureCache.compute(enc, Items([np.zeros((28, 28), np.uint8)], [0]), torch.device("cpu"))


def test_disk_cache_round_trips_and_is_keyed_by_weights_args_and_items(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder("digits_cnn", width=4, embed_dim=8).freeze("trunk")
    rng = np.random.default_rng(0)
    items = Items([rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in range(6)], [0, 1, 2, 0, 1, 2])
    memory = FeatureCache.build(enc, items, torch.device("cpu"))
    disk = FeatureCache.build(enc, items, torch.device("cpu"), cache_dir=tmp_path)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].startswith("image-")
    again = FeatureCache.build(enc, items, torch.device("cpu"), cache_dir=tmp_path)  # read back, not recomputed
    assert isinstance(np.load(tmp_path / folders[0] / "features.npy", mmap_mode="r"), np.memmap)
    for cache in (disk, again):
        torch.testing.assert_close(cache.gather(torch.tensor([4, 1]))[0], memory.gather(torch.tensor([4, 1]))[0])

    key = cache_key(enc, items)
    assert cache_key(enc, items.subset([0, 1, 2])) != key  # other items
    other_args = create_encoder("digits_cnn", width=4, embed_dim=8, head="mlp")
    other_args.load_state_dict(enc.state_dict(), strict=False)
    assert cache_key(other_args, items) != key  # other build arguments
    with torch.no_grad():
        enc.trunk[0][0].weight[0, 0, 0, 0] += 1e-3  # other trunk weights
    assert cache_key(enc, items) != key
    FeatureCache.build(enc, items, torch.device("cpu"), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # a new entry; the stale one is never read for these weights
    before = cache_key(enc, items)
    with torch.no_grad():
        enc.head.weight.add_(1.0)  # the head is not cached: training it does not invalidate the cache
    assert cache_key(enc, items) == before


def test_the_cache_key_changes_with_item_names_alone_so_other_files_never_read_stale_features(tmp_path):
    """Two folders of six images with the same labels (and so the same count): only the names tell them apart.
    The second build must compute its own features (those of a forward pass here), not map the first one's."""
    torch.manual_seed(0)
    enc = create_encoder("digits_cnn", width=4, embed_dim=8).freeze("trunk")
    rng = np.random.default_rng(0)
    labels = [0, 1, 2, 0, 1, 2]
    images = {folder: [rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in labels] for folder in ("a", "b")}
    items = {folder: Items(images[folder], labels, [f"{folder}/{i}.png" for i in range(6)]) for folder in images}

    key = cache_key(enc, items["a"])
    assert cache_key(enc, Items(images["a"], labels, list(items["a"].names))) == key  # the same items: reused
    assert cache_key(enc, Items(images["a"], labels, [f"c/{i}.png" for i in range(6)])) != key  # renamed alone
    assert cache_key(enc, items["b"]) != key

    FeatureCache.build(enc, items["a"], torch.device("cpu"), cache_dir=tmp_path)
    cached = FeatureCache.build(enc, items["b"], torch.device("cpu"), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    enc.eval()
    with torch.no_grad():
        expected = enc.forward_features(enc.collate([enc.preprocess(x) for x in images["b"]]))
    torch.testing.assert_close(cached.gather(torch.arange(6))[0], expected)


def test_unreadable_disk_cache_names_the_folder(tmp_path):
    (tmp_path / "features.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=str(tmp_path)):
        FeatureCache.load(tmp_path)
