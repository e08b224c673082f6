"""Readers of the real digits data, manifests, augmentation and pairing."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from bind import DataError
from bind.data import build_dataset
from bind.data.digits import EVAL_TEMPLATES, digit_captions, fsdd, mnist, moving_digits, parse_fsdd_name, read_idx
from bind.data.manifest import manifest
from bind.data.pairs import AnchorPairs, EpochSampler, Preprocessed
from bind.recipe import DataSpec
from encoders.audio_augment import AudioAugment, warp_frequency


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big"))
        f.write(images.tobytes())
    np.testing.assert_array_equal(read_idx(path), images)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x00\x07" + bytes(8))
    with pytest.raises(DataError, match="bad: IDX magic number 7"):
        read_idx(tmp_path / "bad")


def test_mnist_splits_do_not_overlap(data_root):
    train, evaluation = mnist(data_root, "train"), mnist(data_root, "eval")
    assert (len(train), len(evaluation)) == (6000, 2000)
    assert train[0].shape == (28, 28) and train[0].dtype == np.uint8
    assert set(train.names).isdisjoint(evaluation.names)
    assert sorted(train.labels.unique().tolist()) == list(range(10))


def test_fsdd_splits_by_speaker(data_root):
    evaluation = fsdd(data_root, "eval", eval_speakers=["nicolas"])
    assert len(evaluation) == 500 and all("_nicolas_" in n for n in evaluation.names)
    train = fsdd(data_root, "train", eval_speakers=["nicolas"], limit=20)
    assert not any("_nicolas_" in n for n in train.names)
    wave, rate = train[0]
    assert rate == 8000 and wave.ndim == 1
    assert parse_fsdd_name(data_root / "fsdd/recordings/7_jackson_12.wav") == (7, "jackson", 12)
    with pytest.raises(DataError, match="eval_speakers \\['alice'\\] not found"):
        fsdd(data_root, "eval", eval_speakers=["alice"])


def test_caption_wordings_differ_between_splits(tmp_path):
    train, evaluation = digit_captions(tmp_path, "train"), digit_captions(tmp_path, "eval")
    assert set(train.names).isdisjoint(evaluation.names)
    assert len(evaluation) == 10 * len(EVAL_TEMPLATES)
    assert "the digit 7" in train.names and int(train.labels[train.names.index("the digit 7")]) == 7


def test_moving_digits_are_deterministic_and_contain_the_digit(data_root):
    videos = moving_digits(data_root, "eval", num_frames=8, canvas=36, limit=3)
    a, b = videos[1], videos[1]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 36, 36)
    image = mnist(data_root, "eval")[1]
    assert abs(int(a[0].sum()) - int(image.sum())) < 0.05 * image.sum()  # the whole digit is on the canvas
    assert not np.array_equal(a[0], a[-1])  # and it moves


def manifest_files(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    rows = [
        {"image": "a.txt", "text": "a dog", "label": "dog", "split": "train"},
        {"image": "a.txt", "text": "a cat", "label": "cat", "split": "train"},
        {"image": "a.txt", "text": "rain", "label": "dog", "split": "eval"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "m.csv", "w") as f:
        f.write(
            "image,text,label,split\n" + "\n".join(f"{r['image']},{r['text']},{r['label']},{r['split']}" for r in rows)
        )


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_manifest_columns_labels_and_splits(tmp_path, name):
    manifest_files(tmp_path)
    text = manifest(tmp_path, "train", name, "text")
    image = build_dataset(DataSpec("manifest", "train", {"path": name, "column": "image"}), str(tmp_path))
    assert list(text) == ["a dog", "a cat"]
    assert image[0] == str((tmp_path / "a.txt").resolve())
    assert text.class_names == ["cat", "dog"]  # sorted over the whole file, not in order of appearance
    assert text.labels.tolist() == [1, 0]
    # the eval split starts with a dog: it must still be class 1, as in train
    assert manifest(tmp_path, "eval", name, "text").labels.tolist() == [1]
    assert manifest(tmp_path, "*", name, "text").labels.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match="no column 'audio'; columns are image, text, label, split"):
        manifest(tmp_path, "train", name, "audio")
    with pytest.raises(DataError, match="no rows of split 'test'; its splits are eval, train"):
        manifest(tmp_path, "test", name, "text")


def test_a_manifest_column_holds_text_when_no_cell_names_a_file_whatever_its_name(tmp_path):
    (tmp_path / "a.png").write_text("x")
    rows = [
        {"photo": "a.png", "caption": "a.png", "words": "a dog"},  # "a.png" as a caption still names a file here
        {"photo": "missing.png", "caption": "rain " * 100, "words": "x/" * 300},  # too long for a file name
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(manifest(tmp_path, "train", "m.jsonl", "words")) == ["a dog", "x/" * 300]
    photos = manifest(tmp_path, "train", "m.jsonl", "photo")  # one missing file: still paths, not captions
    assert list(photos) == [str((tmp_path / name).resolve()) for name in ("a.png", "missing.png")]
    # a column that mixes a file name with text is read as paths unless the recipe says kind: text
    assert manifest(tmp_path, "train", "m.jsonl", "caption", kind="text")[0] == "a.png"


def test_manifest_integer_labels_sort_as_numbers(tmp_path):
    rows = "".join(f"t{n},{label}\n" for n, label in enumerate([10, 9, 2, 10]))
    (tmp_path / "m.csv").write_text("text,label\n" + rows)
    items = manifest(tmp_path, "train", "m.csv", "text")
    assert items.class_names == ["2", "9", "10"]
    assert items.labels.tolist() == [2, 1, 0, 2]


def test_label_pairing_always_pairs_the_same_class(data_root):
    images = mnist(data_root, "train", limit=300)
    captions = digit_captions(data_root, "train")
    pairs = AnchorPairs(Preprocessed(images, torch.as_tensor), Preprocessed(captions, lambda s: s), "label", seed=0)
    for epoch in (0, 1):
        for i in range(0, len(pairs), 7):
            image, text, label = pairs[(epoch, i)]
            assert int(captions.labels[i]) == label
            match = [j for j in range(len(images)) if torch.equal(torch.as_tensor(images[j]), image)]
            assert int(images.labels[match[0]]) == label
    epoch0 = [pairs[(0, i)][0] for i in range(20)]
    assert any(not torch.equal(pairs[(1, i)][0], epoch0[i]) for i in range(20))  # fresh partners each epoch
    assert all(torch.equal(pairs[(0, i)][0], epoch0[i]) for i in range(20))  # the same epoch draws the same ones


def test_epoch_sampler_reshuffles_each_pass_and_is_seeded():
    sampler = EpochSampler(10, seed=3)
    first, second = list(sampler), list(sampler)
    assert [e for e, _ in first] == [0] * 10 and [e for e, _ in second] == [1] * 10
    assert sorted(i for _, i in first) == list(range(10)) and first != second
    assert list(EpochSampler(10, seed=3)) == first


def test_audio_augment_is_seeded_and_changes_the_signal():
    wave = np.sin(np.linspace(0, 400, 8000)).astype(np.float32)
    aug = AudioAugment()
    a, rate = aug.augment_raw((wave, 8000), torch.Generator().manual_seed(1))
    b, _ = aug.augment_raw((wave, 8000), torch.Generator().manual_seed(1))
    c, _ = aug.augment_raw((wave, 8000), torch.Generator().manual_seed(2))
    assert rate == 8000 and np.array_equal(a, b) and not np.array_equal(a, c)
    feats = torch.randn(1, 1, 64, 50)
    masked = aug.augment_tensor(feats, torch.Generator().manual_seed(0))
    assert masked.shape == feats.shape and (masked != feats).any() and torch.equal(feats, feats.clone())


def test_frequency_warp_keeps_shape_and_moves_formants():
    feats = torch.zeros(1, 1, 40, 5)
    feats[..., 10, :] = 1.0  # one "formant" at bin 10
    assert torch.allclose(warp_frequency(feats, 1.0), feats)
    up, down = warp_frequency(feats, 1.2), warp_frequency(feats, 0.8)
    assert up.shape == down.shape == feats.shape
    assert up[0, 0, :, 0].argmax() == 12 and down[0, 0, :, 0].argmax() == 8
