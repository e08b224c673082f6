"""WebDataset shards: manifest round trip, splitting over ranks and workers, shuffling, bad samples, CLI."""

from __future__ import annotations

import csv
import json
import re
import tarfile

import numpy as np
import pytest
import soundfile
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

from bind import ConfigError, DataError, create_encoder
from bind.cli import main
from bind.data.shard_stream import ShardPairs, ShardPreprocessed, ShardStream, collate_with_bad
from bind.data.shard_writer import write_shards
from bind.data.shards import ShardIndex, shards

CLASSES = ["cat", "dog", "bird"]  # in order of appearance; class ids follow the sorted names
CLASS_IDS = [sorted(CLASSES).index(c) for c in CLASSES]  # row i has class id CLASS_IDS[i % 3]


def make_manifest(folder, rows=10, split_column=False):
    """``rows`` rows of a PNG image, a WAV recording, a caption and a label (as a user's manifest would be)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    (folder / "wav").mkdir()
    lines = []
    for i in range(rows):
        shape = (12, 10, 3) if i % 4 == 3 else (28, 28)  # one in four RGB, the rest grayscale
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img/{i}.png")
        wave = (0.1 * rng.standard_normal(800 + 100 * i)).astype(np.float32)
        soundfile.write(folder / f"wav/{i}.wav", wave, 8000, subtype="PCM_16")
        row = {"image": f"img/{i}.png", "audio": f"wav/{i}.wav", "text": f"caption {i}, with a comma", "label": ""}
        row["label"] = CLASSES[i % 3]
        if split_column:
            row["split"] = ["train", "eval", ""][i % 3]
        lines.append(row)
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    return path


@pytest.fixture
def manifest(tmp_path):
    return make_manifest(tmp_path / "data")


def keys_of(stream, *args):
    return [sample[0]["text"] for sample in stream.iterate(*args)]


def test_round_trip_keeps_every_row_once_with_identical_bytes_and_values(manifest, tmp_path):
    paths = write_shards(manifest, tmp_path / "shards", samples_per_shard=3)
    assert [p.name for p in paths] == [f"shard-00000{i}.tar" for i in range(4)]
    index = ShardIndex.load(tmp_path / "shards")
    assert index.counts == [3, 3, 3, 1] and index.samples == 10
    assert index.columns == {"image": ["png"], "audio": ["wav"], "text": ["txt"]}
    assert index.class_names == sorted(CLASSES)

    stream = ShardStream(tmp_path / "shards", shuffle=False, shuffle_buffer=0)
    samples = list(stream.iterate(0))
    assert len(samples) == len(stream) == 10
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    for i, (members, label, bad) in enumerate(samples):
        assert bad == []
        assert label == CLASS_IDS[i % 3] and members["text"] == rows[i]["text"]
        np.testing.assert_array_equal(
            np.array(members["image"]), np.array(Image.open(manifest.parent / f"img/{i}.png"))
        )
        wave, rate = members["audio"]
        expected, expected_rate = soundfile.read(manifest.parent / f"wav/{i}.wav", dtype="float32")
        assert rate == expected_rate and wave.ndim == 1
        np.testing.assert_array_equal(wave, expected)

    # any WebDataset reader sees the same samples, with the files' exact bytes
    plain = list(webdataset.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in plain] == [f"{i:06d}" for i in range(10)]
    for i, sample in enumerate(plain):
        assert sample["image.png"] == (manifest.parent / f"img/{i}.png").read_bytes()
        assert sample["audio.wav"] == (manifest.parent / f"wav/{i}.wav").read_bytes()
        assert sample["label.cls"] == str(CLASS_IDS[i % 3]).encode()


def test_rewriting_gives_identical_shards_and_needs_overwrite(manifest, tmp_path):
    first = write_shards(manifest, tmp_path / "a", samples_per_shard=4)
    second = write_shards(manifest, tmp_path / "b", samples_per_shard=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        write_shards(manifest, tmp_path / "a")
    write_shards(manifest, tmp_path / "a", samples_per_shard=100, overwrite=True)
    assert ShardIndex.load(tmp_path / "a").counts == [10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "data"]  # no temporary folder left


def test_split_and_byte_limit(tmp_path):
    path = make_manifest(tmp_path / "data", rows=9, split_column=True)
    write_shards(path, tmp_path / "train", split="train")  # train rows and rows without a split
    stream = ShardStream(tmp_path / "train", shuffle=False, shuffle_buffer=0)
    assert keys_of(stream, 0) == [f"caption {i}, with a comma" for i in range(9) if i % 3 != 1]
    with pytest.raises(DataError, match="holds split 'train', not 'eval'"):
        shards(tmp_path, "eval", path="train", column="text")
    write_shards(path, tmp_path / "all", max_shard_bytes=4000)  # every row, with its split.txt
    counts = ShardIndex.load(tmp_path / "all").counts
    assert sum(counts) == 9 and len(counts) > 1
    evaluation = shards(tmp_path, "eval", path="all", column="text")  # eval rows and rows without a split
    assert [evaluation[i] for i in range(len(evaluation))] == [f"caption {i}, with a comma" for i in range(9) if i % 3]


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_by_two_workers_read_disjoint_samples_covering_everything(manifest, tmp_path, epoch):
    write_shards(manifest, tmp_path / "shards", samples_per_shard=1)  # 10 shards over 4 readers: 3, 3, 2, 2
    seen = []
    for rank in range(2):
        stream = ShardStream(tmp_path / "shards", shuffle_buffer=3, seed=5, rank=rank, world_size=2)
        stream.set_epoch(epoch)
        rank_keys = [k for worker in range(2) for k in keys_of(stream, epoch, worker, 2)]
        assert len(rank_keys) == len(stream) == 5
        seen += rank_keys
    assert sorted(seen) == sorted(f"caption {i}, with a comma" for i in range(10))


def test_dataloader_workers_split_the_shards(manifest, tmp_path):
    write_shards(manifest, tmp_path / "shards", samples_per_shard=2)
    stream = ShardStream(tmp_path / "shards", seed=1, shuffle_buffer=4)
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    labels = [int(label) for _, label, _ in loader]
    assert sorted(labels) == sorted(CLASS_IDS[i % 3] for i in range(10))


def test_shuffle_is_seeded_per_epoch(manifest, tmp_path):
    write_shards(manifest, tmp_path / "shards", samples_per_shard=2)
    stream = ShardStream(tmp_path / "shards", seed=3, shuffle_buffer=4)
    epoch0, epoch1 = keys_of(stream, 0), keys_of(stream, 1)
    assert keys_of(stream, 0) == epoch0 and sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert [s[0]["text"] for s in stream] == epoch0  # each pass is the next epoch
    assert [s[0]["text"] for s in stream] == epoch1
    stream.set_epoch(0)
    assert [s[0]["text"] for s in stream] == epoch0
    other_seed = ShardStream(tmp_path / "shards", seed=4, shuffle_buffer=4)
    assert keys_of(other_seed, 0) != epoch0


def test_shard_pairs_batches_feed_the_encoders(manifest, tmp_path):
    write_shards(manifest, tmp_path / "shards", samples_per_shard=5)
    image = create_encoder("digits_cnn", width=4, embed_dim=16).eval()
    audio = create_encoder("audio_cnn", embed_dim=16, width=4, depth=2, n_mels=16, clip_seconds=0.5).eval()
    pairs = ShardPairs(tmp_path / "shards", "image", "audio", image.preprocess, audio.preprocess, seed=0)

    def collate(batch):
        return (
            image.collate([b[0] for b in batch]),
            audio.collate([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]),
        )

    loader = DataLoader(pairs, batch_size=4, drop_last=True, collate_fn=collate_with_bad(collate))
    batches = list(loader)
    assert len(batches) == 2
    anchor_x, x, labels, bad = batches[0]
    assert anchor_x.shape == (4, 1, 28, 28) and labels.shape == (4,) and bad == []
    with torch.no_grad():
        assert image(anchor_x).shape == audio(x).shape == (4, 16)

    single = ShardPreprocessed(tmp_path / "shards", "text", lambda t: len(t), shuffle=False, shuffle_buffer=0)
    assert [(n, label) for n, label, _ in single.iterate(0)][:2] == [
        (len("caption 0, with a comma"), CLASS_IDS[0]),
        (len("caption 1, with a comma"), CLASS_IDS[1]),
    ]
    with pytest.raises(DataError, match="no column 'video'; columns are image, audio, text"):
        ShardPairs(tmp_path / "shards", "image", "video", image.preprocess, audio.preprocess)


def test_a_corrupt_member_is_skipped_and_reported(manifest, tmp_path):
    (manifest.parent / "img/3.png").write_bytes(b"not a png")
    write_shards(manifest, tmp_path / "shards", samples_per_shard=5)
    image = create_encoder("digits_cnn", width=4, embed_dim=16)
    pairs = ShardPairs(tmp_path / "shards", "image", "text", image.preprocess, str, shuffle=False, shuffle_buffer=0)
    samples = list(pairs.iterate(0))
    assert [s[1] for s in samples] == [f"caption {i}, with a comma" for i in range(10) if i != 3]
    (name, message), *rest = samples[3][3]  # reported with the next good sample
    assert name == "shard-000000.tar/000003" and "cannot decode .png" in message and rest == []
    strict = ShardPairs(tmp_path / "shards", "image", "text", image.preprocess, str, shuffle=False, skip_bad=False)
    with pytest.raises(OSError, match="cannot identify image"):
        list(strict.iterate(0))


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_truncated_shard_loses_only_its_tail_and_says_so(manifest, tmp_path, cut):
    paths = write_shards(manifest, tmp_path / "shards", samples_per_shard=5)
    with tarfile.open(paths[0]) as tar:
        image = tar.getmember("000000.image.png")  # the first sample's second member
    end = (image.offset if cut == "header" else image.offset_data) + 100
    paths[0].write_bytes(paths[0].read_bytes()[:end])
    samples = list(ShardStream(tmp_path / "shards", shuffle=False, shuffle_buffer=0).iterate(0))
    assert [s[0]["text"] for s in samples] == [f"caption {i}, with a comma" for i in range(5, 10)]
    bad = dict(samples[0][2])  # reported with the first good sample
    assert re.match(r"damaged tar: [01] of 5 samples read", bad["shard-000000.tar"])
    if cut == "header":  # tarfile takes a cut header for the end: the sample so far comes out incomplete
        assert "no 'image' member" in bad["shard-000000.tar/000000"]
    with pytest.raises(DataError, match="shard-000000.tar"):
        list(ShardStream(tmp_path / "shards", shuffle=False, shuffle_buffer=0, skip_bad=False).iterate(0))


def test_map_style_items_read_by_offset(manifest, tmp_path):
    write_shards(manifest, tmp_path / "shards", samples_per_shard=4)
    items = shards(tmp_path, "train", path="shards", column="audio")
    assert len(items) == 10 and items.labels.tolist() == [CLASS_IDS[i % 3] for i in range(10)]
    assert items.class_names == sorted(CLASSES) and items.names[5] == "shard-000001.tar/000005"
    wave, rate = items[7]
    np.testing.assert_array_equal(wave, soundfile.read(manifest.parent / "wav/7.wav", dtype="float32")[0])


def test_cli_writes_shards_and_names_a_missing_file(manifest, tmp_path, capsys):
    out = tmp_path / "shards"
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", str(manifest), "--out", str(out), "--samples-per-shard", "4"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "shard-000002.tar  2 samples" in printed and "10 samples in 3 shards" in printed
    assert json.loads((out / "index.json").read_text())["samples"] == 10

    (manifest.parent / "wav/6.wav").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", str(manifest), "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "row 7 (audio)" in err and "wav/6.wav not found" in err
    assert not (tmp_path / "again").exists()


def streamed_recipe(shard_dir, length: dict) -> dict:
    """A tiny bind stage that streams image-audio row pairs from ``shard_dir``; ``length``: epochs or steps."""

    def data(column):
        args = {"path": str(shard_dir), "column": column}
        return {"source": "shards", "args": args, "stream": True, "shuffle_buffer": 4}

    return {
        "anchor_modality": "image",
        "embed_dim": 8,
        "device": "cpu",
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": data("image")},
            "audio": {
                "encoder": "audio_cnn",
                "args": {"width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5},
                "train_data": data("audio"),
            },
        },
        "stages": [{"name": "bind", "kind": "bind", "pairs": {"audio": {"pairing": "row", "batch_size": 4}}, **length}],
    }


def test_a_bind_stage_streams_row_pairs_from_shards(manifest, tmp_path):
    from bind.recipe import parse_recipe
    from bind.train.trainer import run_recipe

    out = tmp_path / "shards"
    write_shards(manifest, out, samples_per_shard=3)
    recipe = streamed_recipe(out, {"epochs": 2})
    run_recipe(parse_recipe(recipe), tmp_path / "run", show_progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r]
    assert steps[-1]["step"] == 2 * (10 // 4)  # an epoch is the shards' 10 samples over the batch of 4
    assert all(np.isfinite(r["loss"]) for r in steps)

    recipe["stages"][0]["pairs"]["audio"]["pairing"] = "label"
    with pytest.raises(ConfigError, match="streamed shards pair by row"):
        parse_recipe(recipe)
