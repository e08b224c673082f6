"""Image and video augmentation (encoders/image_augment.py): the geometry it promises, exactly; reproducibility;
one draw for all the frames of a clip; the recipe's knobs checked in one line. And the digit eval sets made the
way other programs make files (bind/data/digits.py: mnist_rescaled, moving_digits_mp4)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT

from bind import ConfigError
from bind.data.augment import build_augment
from bind.registry import get_encoder_info
from encoders.image_augment import PLAIN, ImageAugment, VideoAugment, apply_draw


def square(size: int = 32, low: int = 8, high: int = 24) -> torch.Tensor:
    """A white square [low, high) x [low, high) on black, (1, size, size)."""
    x = torch.zeros(1, size, size)
    x[:, low:high, low:high] = 1
    return x


def ink_box(x: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows and columns holding ink, inclusive."""
    rows = torch.nonzero(x[0].amax(1) > threshold).flatten()
    cols = torch.nonzero(x[0].amax(0) > threshold).flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def test_a_draw_that_changes_nothing_computes_the_identity():
    x = torch.rand(3, 20, 30)
    torch.testing.assert_close(apply_draw(x, dataclasses.replace(PLAIN, canvas=20)), x, atol=1e-5, rtol=0)


def test_a_shift_moves_the_content_by_that_fraction_of_the_frame():
    x = square()
    moved = apply_draw(x, dataclasses.replace(PLAIN, shift=(0.25, -0.125)))  # 8 px right, 4 px up
    assert ink_box(moved) == (4, 19, 16, 31)
    torch.testing.assert_close(moved[:, 4:20, 16:], x[:, 8:24, 8:24], atol=1e-5, rtol=0)


def test_a_zoom_out_halves_the_content_and_fills_the_room_with_the_border_colour():
    x = square() * 0.5 + 0.25  # border 0.25, ink 0.75
    small = apply_draw(x, dataclasses.replace(PLAIN, scale=0.5))
    top, bottom, left, right = ink_box(small, threshold=0.5)
    assert (bottom - top + 1, right - left + 1) == (8, 8)  # the 16-px square, half as large, still centred
    assert (top, left) == (12, 12)
    assert small[:, :4].sub(0.25).abs().max() < 1e-5  # the room: the border colour, not black


def test_a_zoom_in_crops_the_centre():
    big = apply_draw(square(), dataclasses.replace(PLAIN, scale=2.0))
    assert ink_box(big) == (0, 31, 0, 31)  # the 16-px square now fills the 32-px frame


def test_a_quarter_turn_equals_rot90():
    x = torch.rand(1, 16, 16)
    turned = apply_draw(x, dataclasses.replace(PLAIN, angle=90.0))
    # the angle turns the content counter-clockwise on screen (y down): rot90 over (W, H)
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(2, 1)), atol=1e-4, rtol=0)


def test_a_canvas_resamples_to_that_height_keeping_the_aspect():
    out = apply_draw(torch.rand(1, 20, 40), dataclasses.replace(PLAIN, canvas=64))
    assert out.shape == (1, 64, 128)
    assert out.min() >= 0 and out.max() <= 1


def test_image_augmentation_is_reproducible_and_varied():
    aug = ImageAugment(scale=(0.5, 1.4), rotate=10, shear=5, aspect=(0.8, 1.2), canvas=(28, 64), brightness=0.2)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    first = aug.augment_raw(digit, torch.Generator().manual_seed(3))
    again = aug.augment_raw(digit, torch.Generator().manual_seed(3))
    other = aug.augment_raw(digit, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert first.shape != other.shape or not torch.equal(first, other)
    assert first.shape[0] == 1 and 28 <= first.shape[1] <= 64  # channels as stored, a canvas from the range


def test_a_video_gets_one_spatial_draw_for_all_its_frames_and_temporal_jitter():
    frame = np.zeros((24, 24), np.uint8)
    frame[4:20, 10:14] = 255
    still = np.stack([frame] * 12)  # a clip whose frames are all the same
    aug = VideoAugment(scale=(0.5, 1.5), rotate=20, canvas=(24, 48), rate=(0.5, 2.0), keep=(0.5, 1.0))
    for seed in range(5):
        out = aug.augment_raw(still, torch.Generator().manual_seed(seed))
        assert torch.equal(out, out[:1].expand_as(out))  # the same transform on every frame
    counted = VideoAugment(scale=None, rotate=0, translate=0, rate=(2.0, 2.0), keep=None)
    ramp = np.arange(12, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2) * 20
    out = counted.augment_raw(ramp, torch.Generator().manual_seed(0))
    assert out.shape[0] == 6  # twice the frame rate: every other frame
    torch.testing.assert_close(out[:, 0, 0, 0] * 255, torch.arange(0, 12, 2).float() * 20)
    # p gates the whole clip: the clips that pass keep every frame at their rate, the others are all changed
    gated = VideoAugment(scale=None, rotate=0, translate=0, rate=(2.0, 2.0), keep=None, p=0.5)
    lengths = [gated.augment_raw(ramp, torch.Generator().manual_seed(s)).shape[0] for s in range(40)]
    assert set(lengths) == {12, 6} and 10 <= lengths.count(12) <= 30


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"scale": [1.4, 0.5]}, "scale must be a range [low, high] with 0 < low <= high, got [1.4, 0.5]"),
        ({"canvas": [28, 100000]}, "canvas must be a range of heights [low, high] in 1..4096 pixels"),
        ({"zoom": 2}, "unknown key"),
    ],
)
def test_bad_knobs_are_one_line_naming_the_key(knobs, message):
    with pytest.raises(ConfigError, match="modalities.image.train_data.augment") as err:
        build_augment(get_encoder_info("digits_cnn"), knobs, "modalities.image.train_data.augment")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_augmenter_gets_the_checked_values_not_the_text_they_were_written_as():
    # YAML reads 1e1 and 5e-2 as strings; the recipe check converts them, and the augmenter must get those numbers
    augment = build_augment(
        get_encoder_info("digits_cnn"), {"rotate": "1e1", "translate": "5e-2", "scale": [0.5, 1]}, "a"
    )
    assert (augment.rotate, augment.translate, augment.scale) == (10.0, 0.05, (0.5, 1.0))
    assert augment.draw(torch.Generator().manual_seed(0)) != PLAIN


def test_every_image_and_video_encoder_offers_its_augmenter():
    from bind.registry import list_encoders

    for name in list_encoders(modality="image"):
        assert get_encoder_info(name).augmenter is ImageAugment
    for name in list_encoders(modality="video"):
        assert get_encoder_info(name).augmenter is VideoAugment


def test_an_augmented_video_feeds_the_video_encoder():
    from bind.registry import create_encoder

    enc = create_encoder("video_frames", frame_encoder="digits_cnn", frame_encoder_kwargs={"width": 4}, embed_dim=8)
    clip = np.random.default_rng(0).integers(0, 256, (10, 30, 30), dtype=np.uint8)
    x = enc.preprocess(VideoAugment(canvas=(40, 60)).augment_raw(clip, torch.Generator().manual_seed(0)))
    assert x.shape[1:] == (8, 1, 28, 28)  # clips of 8 frames, each through the image preprocessing


# ---- eval sets made as other programs make files --------------------------------------------------------


def test_mnist_rescaled_draws_the_digit_at_the_sizes_asked():
    from bind.data.digits import mnist_rescaled

    items = mnist_rescaled(DATA_ROOT, "eval", canvas=[40, 120], height=[0.4, 0.6], limit=30)
    for i in range(len(items)):
        image = items[i]
        assert image.dtype == np.uint8 and image.shape[0] == image.shape[1] and 40 <= image.shape[0] <= 120
        rows = np.nonzero(image.max(1) > 0)[0]
        assert 0.4 - 2 / image.shape[0] <= (rows[-1] - rows[0] + 1) / image.shape[0] <= 0.6 + 2 / image.shape[0]
    assert np.array_equal(items[3], mnist_rescaled(DATA_ROOT, "eval", canvas=[40, 120], height=[0.4, 0.6])[3])


def test_moving_digits_mp4_round_trips_through_h264():
    from bind.data.digits import moving_digits_mp4

    items = moving_digits_mp4(DATA_ROOT, "eval", canvas=[31, 33], num_frames=[9, 9], limit=3)
    clip = items[0]
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8  # even side: H.264 4:2:0 needs it
    assert np.abs(clip[..., 0].astype(int) - clip[..., 1]).max() <= 8  # grey stays grey through YUV
    assert clip.max() > 200 and np.median(clip) < 10  # a bright digit on black, after lossy coding
    assert not np.array_equal(clip[0], clip[-1])  # it moves


def test_rescaled_sets_refuse_absurd_sizes():
    from bind.data.digits import moving_digits_mp4
    from bind.errors import DataError

    with pytest.raises(DataError, match="canvas must lie in 16..1024"):
        moving_digits_mp4(DATA_ROOT, "eval", canvas=[8, 100000])


@pytest.mark.parametrize(
    ("source", "args", "message"),
    [
        ("moving_digits_mp4", {"fps": 0}, "moving_digits_mp4: fps must lie in 1..240"),
        ("moving_digits_mp4", {"canvas": [28]}, "canvas must be an integer or a range [low, high] of them, got [28]"),
        ("moving_digits_mp4", {"num_frames": 8.0}, "num_frames must be an integer or a range"),
        ("mnist_rescaled", {"height": "0.5"}, "height (the digit's, over the frame's) must be a number or a range"),
        ("mnist_rescaled", {"image_format": "gif"}, "image_format must be 'png' or 'jpeg', got 'gif'"),
        ("moving_digits", {"canvas": 20}, "moving_digits: canvas must be an integer in 28..1024, got 20"),
    ],
)
def test_eval_set_arguments_are_checked_when_the_recipe_loads_not_after_training(source, args, message):
    from bind.data import check_data_spec
    from bind.errors import DataError
    from bind.recipe import DataSpec

    spec = DataSpec(source=source, split="eval", args=args)
    with pytest.raises(DataError) as err:
        check_data_spec(spec, str(DATA_ROOT), "eval.sets.rescaled.video")
    text = str(err.value)
    assert text.startswith("eval.sets.rescaled.video: ") and message in text and "\n" not in text


# ---- test-time augmentation ------------------------------------------------------------------------------


def test_test_views_are_the_item_as_it_is_then_fixed_zooms_spread_over_the_training_range():
    from encoders.audio_augment import AudioAugment

    views = ImageAugment(scale=(0.5, 2.0)).test_views(3)
    assert views[0].draw == PLAIN and [v.draw.scale for v in views] == pytest.approx([1.0, 0.5, 2.0])
    assert [v.draw.scale for v in ImageAugment(scale=(0.45, 1.45)).test_views(4)] == pytest.approx(
        [1.0, 0.45, (0.45 * 1.45) ** 0.5, 1.45]  # log-spaced over the range, after the plain view
    )
    assert [v.draw for v in ImageAugment(scale=None).test_views(5)] == [PLAIN]  # nothing varies: one view, not five
    assert all(v.draw.shift == (0.0, 0.0) and v.draw.angle == 0 for v in views)
    digit = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    one, two = (views[0].augment_raw(digit, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert torch.equal(one, two)  # no randomness left
    audio = AudioAugment(freq_warp=(0.8, 1.25)).test_views(3)
    assert [v.freq_warp for v in audio] == [None, pytest.approx((0.8, 0.8)), pytest.approx((1.25, 1.25))]
    assert all(v.speed is None for v in audio)
    speeds = AudioAugment(freq_warp=None, speed=(0.8, 1.2)).test_views(2)
    assert [v.speed for v in speeds] == [None, pytest.approx((0.96**0.5, 0.96**0.5))]  # plain, then the middle speed
    assert len(AudioAugment(freq_warp=None, speed=(0.8, 1.25)).test_views(2)) == 1  # its middle speed is 1: plain
    assert all(v.shift == 0 and v.noise_snr_db is None and v.freq_masks == v.time_masks == 0 for v in audio)


def test_tta_embeddings_are_the_normalised_mean_over_the_views():
    from bind.data import Items
    from bind.evaluate import embed_items
    from bind.model import BindModel
    from bind.registry import create_encoder
    from encoders.image_augment import FixedView

    torch.manual_seed(0)
    model = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=8)}, "image").eval()
    items = Items(list(np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)), [0, 1, 2, 3, 4, 5])
    cpu = torch.device("cpu")
    plain = embed_items(model, "image", items, cpu)
    identity = FixedView(PLAIN, video=False)
    torch.testing.assert_close(embed_items(model, "image", items, cpu, views=[identity, identity]), plain)
    small = FixedView(dataclasses.replace(PLAIN, scale=0.5), video=False)
    zoomed = embed_items(model, "image", items, cpu, views=[small])
    both = embed_items(model, "image", items, cpu, views=[identity, small])
    torch.testing.assert_close(both, torch.nn.functional.normalize(plain + zoomed, dim=-1))
    assert not torch.allclose(zoomed, plain, atol=1e-3)


def test_p_is_the_share_of_items_transformed():
    digit = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    plain = torch.from_numpy(digit).float()[None] / 255
    never = ImageAugment(scale=(0.5, 0.6), p=0.0)
    assert all(torch.equal(never.augment_raw(digit, torch.Generator().manual_seed(s)), plain) for s in range(5))
    half = ImageAugment(scale=(0.5, 0.6), p=0.5)
    kept = sum(torch.equal(half.augment_raw(digit, torch.Generator().manual_seed(s)), plain) for s in range(200))
    assert 70 <= kept <= 130
