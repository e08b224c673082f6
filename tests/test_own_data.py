"""A user's own files: evaluating a run on a manifest, embedding folders, globs and lists, the Python API."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT
from PIL import Image

from bind import ConfigError, DataError
from bind.cli import main
from bind.data import Items
from bind.data.digits import DIGIT_WORDS, read_idx
from bind.evaluate import align_labels
from bind.runs import load_run

# the eval sets (rescaled PNGs and mp4 clips) are another test's business: here they would only cost time
SMALL_EVAL = ["eval.max_items=1000", "modalities.video.eval_data.args.limit=40", "eval.sets={}"]


def bindkit(capsys, *args: object) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``bindkit ARGS`` run in this process (torch is already imported)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_align_labels_maps_by_name_or_number():
    items = Items(["a", "b", "c"], [0, 1, 0], class_names=["seven", "2"])
    aligned = align_labels(items, DIGIT_WORDS, "test")
    assert aligned.labels.tolist() == [7, 2, 7]
    assert list(aligned) == ["a", "b", "c"]
    with pytest.raises(DataError, match="label 'cat' is not a class of the model.*numbers 0..9"):
        align_labels(Items(["a"], [0], class_names=["cat"]), DIGIT_WORDS, "m.csv")


def test_a_run_stores_its_class_names(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["class_names"] == DIGIT_WORDS
    model, _ = load_run(tiny_run)
    assert model.class_names == DIGIT_WORDS


def _write_png_manifest(folder, rows, label_of) -> None:
    images = read_idx(DATA_ROOT / "mnist" / "images-idx3-ubyte.gz")
    labels = read_idx(DATA_ROOT / "mnist" / "labels-idx1-ubyte.gz")
    folder.mkdir()
    lines = ["image,label"]
    for i in rows:
        Image.fromarray(images[i]).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{label_of(int(labels[i]))}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")


def test_eval_on_own_png_manifest_matches_the_run_and_ignores_row_order(tiny_run, tmp_path, capsys):
    """The same 60 eval digits, read from PNG files listed in two orders and with two label spellings,
    score exactly as the run's own in-memory eval split does: labels mean the same class everywhere."""
    code, out, err = bindkit(
        capsys, "eval", tiny_run, *SMALL_EVAL, "modalities.image.eval_data.args.limit=60", "--json", "--no-progress"
    )
    assert code == 0, err
    reference = json.loads(out)
    rows = list(range(6000, 6060))
    _write_png_manifest(tmp_path / "reversed", rows[::-1], str)  # the first row is not a zero
    _write_png_manifest(tmp_path / "named", rows, lambda d: DIGIT_WORDS[d])
    for folder in ("reversed", "named"):
        code, out, err = bindkit(
            capsys, "eval", tiny_run, *SMALL_EVAL, "--data", tmp_path / folder / "pairs.csv", "--json", "--no-progress"
        )
        assert code == 0, err
        results = json.loads(out)
        assert results["zero_shot"]["image"]["accuracy"] == pytest.approx(reference["zero_shot"]["image"]["accuracy"])
        for pair in ("image->text", "audio->image"):
            assert results["retrieval"][pair]["mAP"] == pytest.approx(reference["retrieval"][pair]["mAP"], abs=1e-6)


def test_eval_data_errors_name_the_file(tiny_run, tmp_path, capsys):
    (tmp_path / "m.csv").write_text("picture,label\na.png,3\n")
    code, _, err = bindkit(capsys, "eval", tiny_run, "--data", tmp_path / "m.csv")
    assert code == 2 and "m.csv: no column names a modality of the model (image, text, audio, video)" in err
    (tmp_path / "n.csv").write_text("image,label,split\nmissing.png,3,eval\n")
    code, _, err = bindkit(capsys, "eval", tiny_run, "--data", tmp_path / "n.csv", "--split", "test", "--no-progress")
    assert code == 2 and "no rows of split 'test'" in err


def _three_wavs(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    for name in ("3_jackson_0.wav", "7_nicolas_1.wav", "0_george_2.wav"):
        shutil.copy(DATA_ROOT / "fsdd" / "recordings" / name, folder / name)
    return folder


def test_embed_takes_a_folder_a_glob_or_a_list_and_writes_names(tiny_run, tmp_path, capsys):
    folder = _three_wavs(tmp_path)
    (folder / "list.txt").write_text("7_nicolas_1.wav\n\n0_george_2.wav\n")
    runs = {
        "folder": [folder],
        "glob": [f"{folder}/*_*_*.wav"],
        "list": [f"@{folder / 'list.txt'}"],
    }
    results = {}
    for kind, inputs in runs.items():
        out = tmp_path / f"{kind}.npy"
        code, _, err = bindkit(capsys, "embed", tiny_run, "--modality", "audio", "--out", out, *inputs)
        assert code == 0, err
        names = (tmp_path / f"{kind}.names.txt").read_text().splitlines()
        results[kind] = (np.load(out), names)
    # the folder holds list.txt too: a folder yields only the audio encoder's file types, sorted
    assert results["folder"][1] == results["glob"][1]
    np.testing.assert_array_equal(results["folder"][0], results["glob"][0])
    assert [n.rsplit("/", 1)[1] for n in results["glob"][1]] == ["0_george_2.wav", "3_jackson_0.wav", "7_nicolas_1.wav"]
    assert [n.rsplit("/", 1)[1] for n in results["list"][1]] == ["7_nicolas_1.wav", "0_george_2.wav"]
    np.testing.assert_allclose(results["list"][0], results["glob"][0][[2, 0]], atol=1e-6)
    # retrieve reads the names written beside the gallery
    code, out, err = bindkit(
        capsys,
        "retrieve",
        tiny_run,
        "--query-modality",
        "text",
        "--query",
        "a handwritten seven",
        "--gallery-modality",
        "audio",
        "--gallery-embeddings",
        tmp_path / "glob.npy",
        "--top-k",
        "3",
        "--json",
    )
    assert code == 0, err
    assert sorted(r["item"] for r in json.loads(out)[0]["results"]) == sorted(results["glob"][1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--modality", "txt", "x"],
            "no modality 'txt'; did you mean 'text'? the model has: image, text, audio, video",
        ),
        (["--modality", "text", "--batch-size", "0", "x"], "--batch-size: expected a positive number of items, got 0"),
        (["--modality", "text", "--device", "tpu", "x"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--modality", "audio", "nothing/*.wav"], "nothing/*.wav: no file matches this pattern"),
    ],
)
def test_embed_argument_errors_are_one_line(tiny_run, tmp_path, capsys, args, message):
    code, _, err = bindkit(capsys, "embed", tiny_run, "--out", tmp_path / "x.npy", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_encode_is_the_python_api(tiny_run):
    model, _ = load_run(tiny_run)
    texts = ["a handwritten seven", "the digit three", "nine"]
    z = model.encode("text", texts, batch_size=2)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (3, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(z, model.embed("text", texts).numpy(), atol=1e-6)
    one = model.encode("text", "nine")
    assert one.shape == (model.embed_dim,)
    np.testing.assert_allclose(one, z[2], atol=1e-6)
    assert isinstance(model.encode("text", texts, convert_to_numpy=False), torch.Tensor)
    with pytest.raises(ConfigError, match="batch_size: expected a positive number"):
        model.encode("text", texts, batch_size=0)


def test_validate_names_a_bad_split(capsys):
    code, _, err = bindkit(
        capsys, "validate", "recipes/digits.yaml", f"data_root={DATA_ROOT}", "modalities.audio.eval_data.split=evl"
    )
    assert code == 2
    assert "modalities.audio.eval_data.split: 'fsdd' has splits 'train', 'eval'; got 'evl'; did you mean 'eval'?" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("{source: manifest, args: {column: image}}", "train_data.args: 'manifest' needs path; got ['column']"),
        ("{source: manifest, args: {path: 3, column: image}}", "train_data.args.path: expected text, got 3"),
    ],
)
def test_validate_names_missing_or_mistyped_data_args(override, message):
    from bind.recipe import load_recipe

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe("recipes/digits.yaml", [f"modalities.image.train_data={override}", f"data_root={DATA_ROOT}"])
