"""channels_last: true on towers with a Conv3d (ImageBind's vision stem, left as it is) and with Conv2d (digits_cnn,
made NHWC): no error, the same embeddings and gradients as the contiguous tower."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bind import create_encoder
from bind.encoder import ClipBatch, ModalityEncoder
from bind.train.compile import input_channels_last, to_channels_last
from encoders.imagebind import tiny_config


def tower_and_batch(name: str) -> tuple[ModalityEncoder, object]:
    torch.manual_seed(0)
    if name == "digits_cnn":
        encoder = create_encoder("digits_cnn", embed_dim=16, width=4)
        return encoder.train(), torch.randn(5, 1, 28, 28)
    encoder = create_encoder(name, config=tiny_config("vision"), **({"clips": 2} if name == "imagebind_video" else {}))
    return encoder.train(), encoder.collate([encoder.preprocess(x) for x in encoder.example_inputs(3)])


def pixels(batch: object) -> torch.Tensor:
    return batch.clips if isinstance(batch, ClipBatch) else batch


def embed_and_grads(encoder: ModalityEncoder, batch: object, channels_last: bool) -> tuple[torch.Tensor, ...]:
    """Embeddings, the gradient of a fixed projection of them with respect to the input pixels, and to the stem."""
    x = pixels(batch).clone().requires_grad_()
    given = ClipBatch(x, batch.item_index, batch.num_items) if isinstance(batch, ClipBatch) else x
    if channels_last:
        given = input_channels_last(given)
        if x.ndim == 4:
            assert pixels(given).is_contiguous(memory_format=torch.channels_last)
        else:  # 5-D: the tower's own layout, untouched
            assert pixels(given) is x
    z = encoder(given)
    target = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    (z * target).sum().backward()
    stem = next(m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return z.detach(), x.grad, stem.weight.grad


@pytest.mark.parametrize("name", ["imagebind_video", "imagebind_image"])
def test_a_conv3d_tower_takes_channels_last_with_the_same_results(name):
    encoder, batch = tower_and_batch(name)
    with pytest.raises(RuntimeError, match="required rank 4 tensor"):  # the plain conversion: what trainer.py did
        copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(encoder)
    before = {n: p.data_ptr() for n, p in encoder.named_parameters() if p.ndim != 4}

    assert to_channels_last(encoder) is encoder
    stem = encoder.trunk.patch_embed.weight  # Conv3d (width, 3, 2, 4, 4): left as it is
    assert stem.ndim == 5 and stem.is_contiguous()
    assert isinstance(stem, nn.Parameter) and stem.requires_grad
    after = {n: p.data_ptr() for n, p in encoder.named_parameters() if p.ndim != 4}
    assert after == before  # nothing but 4-D tensors converted

    want = embed_and_grads(reference, batch, channels_last=False)
    got = embed_and_grads(encoder, batch, channels_last=True)
    for g, w, what in zip(got, want, ("embeddings", "input gradient", "stem gradient"), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=what)


def test_a_conv2d_tower_goes_channels_last_with_the_same_results():
    encoder, batch = tower_and_batch("digits_cnn")
    reference = copy.deepcopy(encoder)
    to_channels_last(encoder)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        if conv.in_channels > 1:  # with one input channel both formats are the same strides
            assert not conv.weight.is_contiguous()
    assert all(p.is_contiguous() for p in encoder.parameters() if p.ndim < 4)
    want = embed_and_grads(reference, batch, channels_last=False)
    got = embed_and_grads(encoder, batch, channels_last=True)
    for g, w, what in zip(got, want, ("embeddings", "input gradient", "stem gradient"), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=what)
    # the running statistics of BatchNorm (buffers, 1-D) saw the same batches
    for (name, b), (_, r) in zip(encoder.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b, r, atol=1e-6, rtol=1e-5, msg=name)


def test_input_channels_last_walks_dicts_and_clip_batches_and_leaves_the_rest():
    images, clips, tokens = torch.randn(2, 3, 4, 5), torch.randn(3, 3, 2, 4, 5), torch.arange(6).reshape(2, 3)
    out = input_channels_last({"pixels": images, "clips": clips, "ids": tokens})
    assert out["pixels"].is_contiguous(memory_format=torch.channels_last) and not out["pixels"].is_contiguous()
    assert out["clips"] is clips and out["ids"] is tokens  # 5-D: the layout is the tower's own
    assert torch.equal(out["pixels"], images)
    index = torch.tensor([0, 0, 1])
    walked = input_channels_last(ClipBatch(images.repeat(2, 1, 1, 1)[:3], index, 2, (2, 1)))
    assert walked.clips.is_contiguous(memory_format=torch.channels_last) and not walked.clips.is_contiguous()
    assert walked.item_index is index and walked.num_items == 2 and walked.counts == (2, 1)
    listed = [images]
    assert input_channels_last(listed) is listed  # not a batch kind: as it is
