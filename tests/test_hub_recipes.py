"""The recipes that bind into released spaces (recipes/imagebind_extend.yaml, recipes/clip_audio.yaml) validate and
run end to end with tiny stand-ins in the released formats, and embed/retrieve/eval work on their runs unchanged.

The stand-ins replace only what this machine cannot have (4.5 GB of ImageBind weights, OpenCLIP's LAION weights,
the user's IMU recordings): every other key of the recipe is the shipped one."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import DATA_ROOT
from PIL import Image

from bind.cli import main
from encoders import imagebind, openclip

pytest.importorskip("open_clip")


def bindkit(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def imu_pairs(tmp_path_factory):
    """A user's folder as the recipe expects it: pairs.csv (image, imu, caption, split) and shards/train."""
    root = tmp_path_factory.mktemp("imu_pairs")
    rng = np.random.default_rng(0)
    (root / "frames").mkdir()
    (root / "imu").mkdir()
    rows = []
    for i in range(24):
        kind = i % 3  # three activities: the frame's brightness and the IMU's rhythm both say which
        Image.fromarray(rng.integers(60 * kind, 60 * kind + 80, (20, 24, 3), dtype=np.uint8)).save(
            root / f"frames/{i}.png"
        )
        t = np.arange(400) / 200
        signal = np.sin(2 * np.pi * (1 + 2 * kind) * t)[None] + 0.1 * rng.standard_normal((6, 400))
        np.save(root / f"imu/{i}.npy", signal.astype(np.float32))
        split = "eval" if i % 4 == 0 else "train"
        rows.append({"image": f"frames/{i}.png", "imu": f"imu/{i}.npy", "caption": f"activity {kind}", "split": split})
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return imagebind.save_tiny_checkpoint(tmp_path_factory.mktemp("ib") / "imagebind_tiny.pth")


def imagebind_overrides(checkpoint, imu_pairs) -> list[str]:
    tower = f"{{checkpoint: {checkpoint}, num_heads: 2}}"
    return [
        f"data_root={imu_pairs}",
        "embed_dim=16",  # the tiny checkpoint's output size (1024 in imagebind_huge)
        f"modalities.image.args={tower}",
        f"modalities.text.args={tower}",
        "modalities.imu.args={sample_rate: 200, window_seconds: 2.0, max_windows: 1, patch_size: 8, width: 16, depth: 1, heads: 2}",
        "num_workers=0",
        "stages.0.pairs.imu.batch_size=8",
        "stages.0.chunk_size=4",
        "stages.0.epochs=2",
        "stages.0.log_every=1",
    ]


def test_imagebind_extend_binds_imu_from_shards_into_imagebinds_space(capsys, tmp_path, checkpoint, imu_pairs):
    code, _, err = bindkit(
        capsys, "shard", imu_pairs / "pairs.csv", "--out", imu_pairs / "shards/train", "--split", "train"
    )
    assert code == 0, err
    overrides = imagebind_overrides(checkpoint, imu_pairs)
    code, out, err = bindkit(capsys, "validate", "recipes/imagebind_extend.yaml", *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = bindkit(capsys, "run", "recipes/imagebind_extend.yaml", *overrides, "--out", run, "--no-progress")
    assert code == 0, err
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step" in s]
    assert steps and all(np.isfinite(s["loss"]) for s in steps)
    results = json.loads((run / "eval.json").read_text())
    assert {"imu->image", "imu->text"} <= set(results["retrieval"])  # imu->text: no IMU-text pair was trained

    # the run works with the everyday commands, and its image tower is still ImageBind's (frozen anchor)
    code, out, err = bindkit(
        capsys, "retrieve", run, "--query-modality", "imu", "--query", imu_pairs / "imu/0.npy",
        "--gallery-modality", "text", "--gallery", "activity 0", "activity 1", "activity 2", "--top-k", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert len(json.loads(out)[0]["results"]) == 3
    from bind.runs import load_run

    model, _ = load_run(run)
    released = imagebind.ImageBindEncoder(model["image"].cfg)
    released.load_imagebind(imagebind.read_checkpoint(checkpoint), "tiny")
    frames = [str(imu_pairs / f"frames/{i}.png") for i in range(3)]
    np.testing.assert_allclose(model.embed("image", frames).numpy(), released.eval().embed(frames).numpy(), atol=1e-5)


@pytest.mark.parametrize("verb", ["validate", "run"])
def test_imagebind_extend_names_the_missing_weights_and_their_key(capsys, imu_pairs, tmp_path, verb):
    out = ["--out", tmp_path / "r"] if verb == "run" else []
    code, _, err = bindkit(capsys, verb, "recipes/imagebind_extend.yaml", f"data_root={imu_pairs}", *out)
    assert code == 2
    assert err.splitlines() == [
        f"bindkit {verb}: error: recipes/imagebind_extend.yaml: modalities.image.args.checkpoint: "
        f".checkpoints/imagebind_huge.pth does not exist; download {imagebind.CHECKPOINT_URL}"
    ]
    assert not (tmp_path / "r").exists()  # refused before the run wrote anything


def test_clip_audio_binds_spoken_digits_into_an_open_clip_space(capsys, tmp_path):
    folder = openclip.save_tiny_open_clip(tmp_path / "tiny_open_clip")
    overrides = [
        f"data_root={DATA_ROOT}",
        "embed_dim=16",  # the tiny model's size (512 for ViT-B-32)
        f"modalities.image.args={{path: {folder}}}",
        f"modalities.text.args={{path: {folder}}}",
        "modalities.image.train_data.args.limit=300",
        "modalities.audio.train_data.args.limit=120",
        "modalities.audio.args.width=4",
        "stages.0.steps=3",
        "stages.0.pairs.audio.batch_size=16",
        "eval.max_items=60",
        "num_workers=0",
    ]
    code, _, err = bindkit(capsys, "validate", "recipes/clip_audio.yaml", *overrides)
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = bindkit(capsys, "run", "recipes/clip_audio.yaml", *overrides, "--out", run, "--no-progress")
    assert code == 0, err
    results = json.loads((run / "eval.json").read_text())
    assert {"audio->image", "audio->text"} <= set(results["retrieval"])
    code, out, err = bindkit(capsys, "eval", run, "eval.max_items=30", "--json", "--no-progress")
    assert code == 0, err
    assert "audio" in json.loads(out)["zero_shot"]
    code, _, err = bindkit(capsys, "embed", run, "--modality", "text", "--out", tmp_path / "t.npy", "seven", "one")
    assert code == 0, err
    assert np.load(tmp_path / "t.npy").shape == (2, 16)
