"""GradCache: chunked embedding + replay gives the gradients of the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bind import create_encoder
from bind.encoder import ClipBatch, ModalityEncoder
from bind.losses import info_nce, label_aware_info_nce
from bind.train.gradcache import ChunkedEmbedding, batch_size_of, split_batch


class Tower(nn.Module):
    """An MLP tower with dropout, in float64."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 8)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.requires_grad]


def test_chunked_gradients_equal_whole_batch_gradients_with_dropout():
    a_tower, b_tower = Tower(0), Tower(1)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    x_a, x_b = torch.randn(13, 10, dtype=torch.float64), torch.randn(13, 10, dtype=torch.float64)
    labels = torch.randint(0, 4, (13,))

    # reference: the whole batch with its graph kept (same chunks, so the same dropout draws)
    torch.manual_seed(7)
    z_a = torch.cat([a_tower(c) for c in x_a.split(5)])
    z_b = torch.cat([b_tower(c) for c in x_b.split(5)])
    label_aware_info_nce(z_a, z_b, labels, labels, scale).backward()
    expected, expected_scale = grads(a_tower, b_tower), scale.grad.clone()
    for m in (a_tower, b_tower):
        m.zero_grad()
    scale.grad = None

    torch.manual_seed(7)
    chunked_a = ChunkedEmbedding(a_tower, x_a, chunk_size=5)
    chunked_b = ChunkedEmbedding(b_tower, x_b, chunk_size=5)
    assert not chunked_a.embeddings.grad_fn  # no graph was kept
    label_aware_info_nce(chunked_a.embeddings, chunked_b.embeddings, labels, labels, scale).backward()
    chunked_a.backward()
    chunked_b.backward()
    for got, want in zip(grads(a_tower, b_tower), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(scale.grad, expected_scale, atol=1e-5, rtol=0)

    # the replay's dropout matters: with other masks the gradient is not the same
    for m in (a_tower, b_tower):
        m.zero_grad()
    torch.manual_seed(8)
    z_a = torch.cat([a_tower(c) for c in x_a.split(5)])
    label_aware_info_nce(z_a, z_b.detach(), labels, labels, scale).backward()
    assert (a_tower.net[0].weight.grad - expected[0]).abs().max() > 1e-3


def test_chunked_equals_one_forward_without_dropout_and_leaves_the_rng_alone():
    tower = Tower(0).eval()  # eval: dropout off, so one full forward is the reference
    x, y = torch.randn(10, 10, dtype=torch.float64), F.normalize(torch.randn(10, 8, dtype=torch.float64), dim=-1)
    info_nce(tower(x), y, 5.0).backward()
    expected = grads(tower)
    tower.zero_grad()
    torch.manual_seed(3)
    chunked = ChunkedEmbedding(tower, x, chunk_size=3)
    info_nce(chunked.embeddings, y, 5.0).backward()
    state = torch.get_rng_state()
    chunked.backward()
    assert torch.equal(torch.get_rng_state(), state)  # the replay does not advance the global RNG
    for got, want in zip(grads(tower), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_split_batch_keeps_items_whole():
    clips = ClipBatch(torch.arange(7.0)[:, None], torch.tensor([0, 0, 1, 2, 2, 2, 3]), 4)
    chunks = split_batch(clips, 2)
    assert [c.num_items for c in chunks] == [2, 2]
    assert chunks[0].clips.flatten().tolist() == [0, 1, 2] and chunks[0].item_index.tolist() == [0, 0, 1]
    assert chunks[1].clips.flatten().tolist() == [3, 4, 5, 6] and chunks[1].item_index.tolist() == [0, 0, 0, 1]
    tokens = {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)}
    assert [batch_size_of(c) for c in split_batch(tokens, 2)] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"] for c in split_batch(tokens, 2)]), tokens["input_ids"])


def test_multi_clip_audio_encoder_chunked_matches_whole_batch():
    torch.manual_seed(0)
    enc = create_encoder("audio_vit", embed_dim=16, n_mels=32, clip_seconds=0.5, width=32, depth=1, heads=2)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (3000, 9000, 4000, 12000, 2000)]
    batch = enc.collate([enc.preprocess(w) for w in waves])
    assert isinstance(batch, ClipBatch) and len(batch.item_index) > batch.num_items
    target = F.normalize(torch.randn(5, 16), dim=-1)
    info_nce(enc(batch), target, 10.0).backward()
    expected = grads(enc)
    enc.zero_grad()
    chunked = ChunkedEmbedding(enc, batch, chunk_size=2)
    info_nce(chunked.embeddings, target, 10.0).backward()
    chunked.backward()
    for got, want in zip(grads(enc), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_replay_before_the_loss_backward_is_an_error():
    chunked = ChunkedEmbedding(Tower(0), torch.randn(4, 10, dtype=torch.float64), chunk_size=2)
    with pytest.raises(RuntimeError, match="call backward on the loss first"):
        chunked.backward()


def test_the_replay_device_comes_from_the_batch_by_default():
    from bind.encoder import ClipBatch
    from bind.train.gradcache import ChunkedEmbedding, batch_device

    assert batch_device(torch.zeros(2, 3)) == torch.device("cpu")
    assert batch_device({"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == torch.device("cpu")
    assert batch_device(ClipBatch(torch.zeros(3, 2), torch.tensor([0, 0, 1]), 2)) == torch.device("cpu")
    chunked = ChunkedEmbedding(lambda x: x * 2, torch.zeros(4, 2, device="meta"), chunk_size=2)
    assert chunked.device == torch.device("meta")  # a CUDA batch would restore the CUDA RNG the same way


def test_split_batch_by_counts_slices_what_item_index_selects():
    """collate_clips records clips per item, so chunks are slices (no nonzero, which waits for the GPU); they
    hold exactly the clips the item_index path selects, and carry their own counts on."""
    samples = [torch.full((n, 2), float(i)) for i, n in enumerate([2, 1, 3, 1, 2])]
    batch = ModalityEncoder.collate_clips(samples)
    assert batch.counts == (2, 1, 3, 1, 2)
    by_index = split_batch(ClipBatch(batch.clips, batch.item_index, batch.num_items), 2)
    by_counts = split_batch(batch, 2)
    assert [c.counts for c in by_counts] == [(2, 1), (3, 1), (2,)]
    for a, b in zip(by_counts, by_index, strict=True):
        assert torch.equal(a.clips, b.clips) and torch.equal(a.item_index, b.item_index)
        assert a.num_items == b.num_items and a.clips._base is batch.clips  # a view: nothing copied
