"""Cached trunk features give the embeddings a full forward pass gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bind import create_encoder
from bind.cache import FeatureCache
from bind.data import Items


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
