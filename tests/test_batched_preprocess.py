"""Batched preprocessing: a DataLoader worker's ``preprocess_many`` gives what item-by-item preprocessing gives.

The reference is always the plain loop ``augment_tensor(preprocess(augment_raw(item, g)), g)`` with the same
per-item generators; the batched path must match it to float precision, including the random draws.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from bind.data import Items
from bind.data.pairs import AnchorPairs, Preprocessed, item_generator
from bind.registry import create_encoder
from bind.train.malloc import tune_malloc
from encoders.audio_augment import AudioAugment
from encoders.image_augment import PLAIN, ImageAugment, VideoAugment, apply_draw, render, resize_matrix

DIGITS_AUGMENT = {
    "scale": (0.45, 1.45),
    "translate": 0.05,
    "rotate": 10,
    "shear": 5,
    "aspect": (0.85, 1.15),
    "canvas": (28, 128),
    "brightness": 0.2,
    "contrast": 0.2,
    "p": 0.75,
}


def loop(encoder, items, augment, seed=0):
    """The reference: item by item, as ``Preprocessed.load`` did before batching."""
    if augment is None:
        return [encoder.preprocess(item) for item in items]
    out = []
    for i, item in enumerate(items):
        g = item_generator(seed, 1, i)
        out.append(augment.augment_tensor(encoder.preprocess(augment.augment_raw(item, g)), g))
    return out


def many(encoder, items, augment, seed=0):
    gens = [item_generator(seed, 1, i) for i in range(len(items))] if augment is not None else None
    return encoder.preprocess_many(items, augment, gens)


def assert_close(got, want, atol):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def mixed_images(n: int) -> list:
    """Gray uint8 digits-sized images, RGB float ones of another shape, and a few large ones."""
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]
    rgb = [rng.random((40, 30, 3), dtype=np.float32) for _ in range(n // 2)]
    return gray + rgb + [rng.integers(0, 256, (300, 200), dtype=np.uint8) for _ in range(3)]


@pytest.mark.parametrize("augment", [ImageAugment(**DIGITS_AUGMENT), ImageAugment(canvas=(200, 400), p=1.0), None])
def test_images_rendered_as_a_batch_equal_the_item_by_item_path(augment):
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    items = mixed_images(40)
    assert_close(many(enc, items, augment), loop(enc, items, augment), atol=1e-4)


def test_a_three_channel_tower_gets_gray_images_as_rgb_in_the_batch():
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    enc.channels, enc.mean, enc.std = 3, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    items, augment = mixed_images(10), ImageAugment(**DIGITS_AUGMENT)
    got = many(enc, items, augment)
    assert {x.shape for x in got} == {(3, 28, 28)}
    assert_close(got, loop(enc, items, augment), atol=1e-4)


def test_render_of_a_clip_is_apply_draw_then_the_resize_of_each_frame():
    rng = np.random.default_rng(1)
    clips = [torch.from_numpy(rng.random((5, 1, 36, 36), dtype=np.float32)) for _ in range(6)]
    aug = ImageAugment(**DIGITS_AUGMENT | {"p": 1.0})
    draws = [aug.draw(item_generator(0, 0, i)) for i in range(len(clips))] + [PLAIN]
    clips.append(clips[0])
    want = []
    for clip, d in zip(clips, draws, strict=True):
        y = apply_draw(clip, d)
        want.append(y if y.shape[-2:] == (28, 28) else TF.resize(y, [28, 28], antialias=True))
    assert_close(render(clips, draws, (28, 28)), want, atol=1e-4)


def test_resize_matrix_is_torchvisions_antialiased_resize():
    x = torch.rand(3, 57, 91)
    want = TF.resize(x, [28, 20], antialias=True)
    got = resize_matrix(57, 28) @ x @ resize_matrix(91, 20).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(resize_matrix(28, 28), torch.eye(28))


def moving_clips(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.integers(0, 256, (int(rng.integers(3, 14)), 36, 36), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("augment", [VideoAugment(**DIGITS_AUGMENT | {"p": 0.8}), None])
def test_video_clips_rendered_as_a_batch_equal_the_item_by_item_path(augment):
    enc = create_encoder(
        "video_frames", frame_encoder="digits_cnn", frame_encoder_kwargs={"width": 4}, embed_dim=8, num_frames=4
    )
    items = moving_clips(12)
    assert_close(many(enc, items, augment), loop(enc, items, augment), atol=1e-4)


@pytest.mark.parametrize("augment", [AudioAugment(freq_warp=(0.85, 1.15)), None])
def test_audio_through_the_frontend_as_a_batch_equals_the_item_by_item_path(augment):
    enc = create_encoder("audio_cnn", n_mels=40, lifter=20, normalize="utterance_bins", width=4, embed_dim=8)
    rng = np.random.default_rng(3)
    items = [(rng.standard_normal(int(rng.integers(2000, 12000))).astype(np.float32) * 0.1, 8000) for _ in range(9)]
    items.append((rng.standard_normal((2, 3000)).astype(np.float32), 16000))  # stereo, another rate
    assert_close(many(enc, items, augment), loop(enc, items, augment), atol=1e-4)


def test_a_bad_item_in_a_batch_is_skipped_and_recorded_as_one_at_a_time():
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    images = [np.full((28, 28), i * 9, np.uint8) for i in range(8)]
    images[3] = np.full((28, 28), np.nan, np.float32)  # NaN: not an image
    data = Items(images, list(range(8)), names=[f"digit{i}.png" for i in range(8)])
    make = lambda: Preprocessed(  # noqa: E731
        data, enc.preprocess, ImageAugment(**DIGITS_AUGMENT), seed=5, skip_bad=True, preprocess_many=enc.preprocess_many
    )
    batched, single = make(), make()
    keys = [(2, i) for i in range(8)]
    got, want = batched.__getitems__(keys), [single[k] for k in keys]
    assert [label for _, label in got] == [label for _, label in want] == [0, 1, 2, 4, 4, 5, 6, 7]
    assert_close([x for x, _ in got], [x for x, _ in want], atol=0)
    assert batched.drain_bad() == single.drain_bad() and len(single.bad) == 0
    without_bad = [(2, i) for i in (0, 1, 2, 4)]
    assert_close([x for x, _ in batched.__getitems__(without_bad)], [x for x, _ in want[:3] + want[4:5]], atol=1e-4)
    assert batched.drain_bad() == []
    strict = Preprocessed(data, enc.preprocess, preprocess_many=enc.preprocess_many)  # evaluation: never skips
    with pytest.raises(ValueError, match="NaN"):
        strict.__getitems__([0, 3])


@pytest.mark.parametrize("pairing", ["label", "row"])
def test_anchor_pairs_of_a_batch_equal_the_pairs_one_at_a_time(pairing):
    enc = create_encoder("digits_cnn", width=4, embed_dim=8)
    rng = np.random.default_rng(4)
    images = Items([rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(12)], [i % 3 for i in range(12)])
    anchor = Preprocessed(images, enc.preprocess, preprocess_many=enc.preprocess_many)
    other = Preprocessed(
        images, enc.preprocess, ImageAugment(**DIGITS_AUGMENT), seed=1, preprocess_many=enc.preprocess_many
    )
    pairs = AnchorPairs(anchor, other, pairing, seed=3)
    keys = [(1, i) for i in (5, 0, 11, 7)]
    got, want = pairs.__getitems__(keys), [pairs[k] for k in keys]
    assert [g[2] for g in got] == [w[2] for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[0], w[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(g[1], w[1], atol=1e-4, rtol=0)


def test_tune_malloc_sets_glibc_and_leaves_a_users_own_choice(monkeypatch):
    import os

    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "BINDKIT_MALLOC", "LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert tune_malloc() is True
    monkeypatch.setenv("BINDKIT_MALLOC", "system")
    assert tune_malloc() is False
    monkeypatch.delenv("BINDKIT_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert tune_malloc() is False


def test_audio_augmentation_reads_files_stereo_pairs_and_arrays_as_the_encoder_does(tmp_path):
    import soundfile as sf

    wave = np.sin(np.arange(12000) / 7).astype(np.float32) * 0.3
    sf.write(tmp_path / "stereo.wav", np.stack([wave, wave * 0.5], axis=1), 12000)  # (samples, channels)
    aug = AudioAugment(shift=0, speed=None, gain_db=0, noise_snr_db=None)
    from_file, rate = aug.augment_raw(str(tmp_path / "stereo.wav"), torch.Generator())
    assert rate == 12000 and from_file.shape == (12000,)
    np.testing.assert_allclose(from_file, wave * 0.75, atol=1e-4)
    from_pair, rate = aug.augment_raw((np.stack([wave, wave * 0.5]), 12000), torch.Generator())  # (channels, n)
    np.testing.assert_allclose(from_pair, from_file, atol=1e-4)  # the file holds 16-bit samples
    assert rate == 12000
    np.testing.assert_allclose(aug.augment_raw(wave, torch.Generator()), wave, atol=0)  # stays at the encoder's rate
