"""Files from a stranger: paths that leave their folder, inputs too large to read whole, damaged numbers.

One test per row of the "Trust boundaries and crash safety" issue: a run's config.json or a shard index
naming files outside its folder, an hour of audio or a huge image, NaN or mis-shaped weights, bad gallery
embeddings, and a truncated tar in a streamed run; then the "one set of rules" issue: config.json keys of the
wrong type, malformed manifests and shard indexes, sparse, oversized or lying tar members, labels that are not
class indexes. Each is refused with one line naming the file and key (and line), or (long audio, damaged
shards, bad members) handled within bounded memory without stopping the run, the bad items counted.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from bind import ConfigError, DataError, InputError, create_encoder
from bind.data.shard_stream import ShardStream
from bind.data.shard_writer import write_shards
from bind.data.shards import ShardIndex, shards
from bind.model import BindModel
from bind.retrieval import SearchIndex, check_finite, load_embeddings, open_gallery
from encoders.audio_io import load_audio, split_clips
from encoders.image_io import load_image

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"
AUDIO_ARGS = {"embed_dim": 16, "width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5}


def audio_encoder(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder("audio_cnn", **{**AUDIO_ARGS, **overrides}).eval()


def saved_model(directory: Path) -> Path:
    """A small saved model (digits_cnn image + audio_cnn audio, embed_dim 16): config.json + model.safetensors."""
    torch.manual_seed(0)
    encoders = {"image": create_encoder("digits_cnn", width=4, embed_dim=16), "audio": audio_encoder()}
    return BindModel(encoders, anchor_modality="image").save_pretrained(directory)


# ---- config.json: asset paths stay inside the run ------------------------------------------------------
@pytest.fixture
def run_with_asset(tmp_path):
    """A saved model plus a function that points an HF text encoder's asset ``path`` (or another key) anywhere."""
    run = saved_model(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())

    def point_to(path: str, key: str = "path") -> None:
        spec = {"name": "hf_text", "kwargs": {key: path, "load_weights": False, "embed_dim": 16}, "assets": True}
        (run / "config.json").write_text(json.dumps({**config, "encoders": {**config["encoders"], "text": spec}}))

    return run, point_to


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink"])
def test_an_asset_path_leaving_the_run_folder_is_refused(run_with_asset, tmp_path, kind):
    run, point_to = run_with_asset
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")  # would look like an HF model folder if it were followed
    if kind == "relative":
        path = "../outside"
    elif kind == "absolute":
        path = str(outside)
    else:
        (run / "assets").mkdir()
        (run / "assets" / "text").symlink_to(outside, target_is_directory=True)
        path = "assets/text"
    point_to(path)
    with pytest.raises(DataError) as err:
        BindModel.from_pretrained(run)
    message = str(err.value)
    assert message.startswith(f"{run / 'config.json'}: encoders.text.kwargs.path: {path!r} resolves to {outside}")
    assert "outside" in message and "\n" not in message


def test_an_absolute_system_path_and_a_nested_weights_path_are_refused(run_with_asset):
    run, point_to = run_with_asset
    point_to("/etc")
    with pytest.raises(DataError, match=r"encoders.text.kwargs.path: '/etc' resolves to /etc, outside"):
        BindModel.from_pretrained(run)
    point_to("/etc/passwd", key="weights_path")
    with pytest.raises(DataError, match=r"encoders.text.kwargs.weights_path: '/etc/passwd'"):
        BindModel.from_pretrained(run)
    # nested arguments (a video encoder's frame_encoder_kwargs) are checked too
    config = json.loads((run / "config.json").read_text())
    config["encoders"]["text"]["kwargs"] = {"frame_encoder_kwargs": {"path": "../../x"}}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"encoders.text.kwargs.frame_encoder_kwargs.path: '../../x' resolves to"):
        BindModel.from_pretrained(run)


def test_an_asset_path_inside_the_run_is_followed(run_with_asset):
    run, point_to = run_with_asset
    (run / "assets" / "text").mkdir(parents=True)
    point_to("assets/text")  # passes the check; the folder is then read (and found not to hold an HF model)
    with pytest.raises(DataError, match="is a directory without config.json") as err:
        BindModel.from_pretrained(run)
    assert str((run / "assets" / "text").resolve()) in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("image", "width", "4"), r"encoders.image.kwargs.width: expected an integer, got '4'"),
        (("audio", "clip_seconds", None), r"encoders.audio.kwargs.clip_seconds: expected a finite number, got None"),
        (("audio", "n_mels", True), r"encoders.audio.kwargs.n_mels: expected an integer, got True"),
        (("image", "bogus", 1), r"encoders.image.kwargs.bogus: encoder 'digits_cnn' takes no such argument; it takes"),
        (("image", "embed_dim", 32), r"encoders.image.kwargs.embed_dim: 32, but the model's embed_dim is 16"),
        (("image", "freeze", "most"), r"encoders.image.freeze: expected 'none', 'trunk' or 'all', got 'most'"),
        (("image", "unfreeze_last_blocks", 1), r"encoders.image.unfreeze_last_blocks: 1 goes with freeze 'trunk'"),
        ((None, "shared_trunks", ["audio"]), r"shared_trunks: expected a mapping of modality -> another modality"),
        ((None, "anchor_modality", "text"), r"anchor_modality: expected one of image, audio, got 'text'"),
        ((None, "class_names", [1, 2]), r"class_names: expected a list of strings or null, got \[1, 2\]"),
    ],
)
def test_a_config_key_of_the_wrong_type_or_value_is_one_line_naming_the_file_and_key(tmp_path, edit, message):
    run = saved_model(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    modality, key, value = edit
    if modality is None:
        config[key] = value
    elif key in ("freeze", "unfreeze_last_blocks"):
        config["encoders"][modality][key] = value
    else:
        config["encoders"][modality]["kwargs"][key] = value
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        BindModel.from_pretrained(run)
    assert str(err.value).startswith(f"{run / 'config.json'}: ") and "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


# ---- shard index.json: shard files stay inside the shard folder ----------------------------------------
def write_index(folder: Path, shard_file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = {"shards": [{"file": shard_file, "samples": 1}], "columns": {"text": ["txt"]}, "class_names": None}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink"])
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused_before_opening_it(tmp_path, kind, monkeypatch):
    secret = tmp_path / "secret.tar"
    secret.write_bytes(b"not yours")
    folder = tmp_path / "deep" / "er" / "shards"
    if kind == "relative":
        name = "../../../secret.tar"
    elif kind == "absolute":
        name = str(secret)
    else:
        folder.mkdir(parents=True)
        (folder / "shard-000000.tar").symlink_to(secret)
        name = "shard-000000.tar"
    write_index(folder, name)
    opened = []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or pytest.fail("a shard was opened"))
    for load in (ShardIndex.load, ShardStream):
        with pytest.raises(DataError) as err:
            load(folder)
        assert str(err.value).startswith(f"{folder / 'index.json'}: shards[0].file: {name!r} resolves to {secret}")
    assert opened == []


def test_the_etc_hostname_index_of_the_report_is_refused(tmp_path):
    write_index(tmp_path / "shards", "../../../../etc/hostname")
    with pytest.raises(DataError, match=r"shards\[0\].file: '../../../../etc/hostname' resolves to .*, outside"):
        ShardIndex.load(tmp_path / "shards")


# ---- long audio: read clip by clip -----------------------------------------------------------------------
class FrameCounter:
    """Wraps ``soundfile.SoundFile.read`` to count the frames read (-1: the whole file)."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        read = sf.SoundFile.read

        def counting_read(f, frames=-1, *args, **kwargs):
            self.calls.append(frames if frames >= 0 else f.frames - f.tell())
            return read(f, frames, *args, **kwargs)

        monkeypatch.setattr(sf.SoundFile, "read", counting_read)


def write_long_wav(path: Path, seconds: int, rate: int, channels: int = 1) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write((0.1 * rng.standard_normal((60 * rate, channels))).astype(np.float32))


def test_ten_minutes_of_audio_are_read_clip_by_clip_and_give_the_whole_file_clips(tmp_path, monkeypatch):
    path = tmp_path / "ten_minutes.wav"
    write_long_wav(path, 600, 8000)
    enc = audio_encoder()  # 3 clips of 0.5 s at 8 kHz
    counter = FrameCounter(monkeypatch)
    features = enc.preprocess(path)
    assert features.shape[0] == 3
    assert sum(counter.calls) <= 3 * (enc.clip_samples + 1), counter.calls  # of 4.8 million frames
    monkeypatch.undo()
    whole = enc.frontend(*split_clips(load_audio(path, 8000), enc.clip_samples, enc.max_clips))[:, None]
    assert torch.equal(features, whole)  # the very samples the whole-file path would cut


def test_long_audio_at_another_rate_is_read_in_windows_and_agrees_with_resampling_the_whole(tmp_path, monkeypatch):
    path = tmp_path / "two_minutes_44k_stereo.wav"
    write_long_wav(path, 120, 44100, channels=2)
    counter = FrameCounter(monkeypatch)
    clips = audio_encoder().preprocess(path)
    # 3 clips of 0.5 s at 44.1 kHz are 66150 frames (of 5.3 million); the resampling filter reaches a little further
    assert clips.shape[0] == 3 and sum(counter.calls) < 75_000, counter.calls
    monkeypatch.undo()
    enc = audio_encoder()
    whole = enc.frontend(*split_clips(load_audio(path, 8000), enc.clip_samples, enc.max_clips))[:, None]
    torch.testing.assert_close(clips, whole, atol=1e-4, rtol=0)  # float rounding of the filter, nothing more


@pytest.mark.skipif(not FSDD.is_dir(), reason="needs ../shared/data/fsdd")
@pytest.mark.parametrize("clip_seconds", [0.5, 0.1])  # 0.1 s: FSDD files are longer than 3 clips, read in windows
def test_fsdd_recordings_embed_bitwise_as_when_read_whole(clip_seconds):
    files = [FSDD / f"{digit}_{speaker}_{take}.wav" for digit, speaker, take in [(0, "george", 0), (7, "jackson", 3)]]
    files += [FSDD / "3_nicolas_10.wav", FSDD / "9_lucas_49.wav"]
    enc = audio_encoder(clip_seconds=clip_seconds)
    old_batch = enc.collate(
        [enc.frontend(*split_clips(load_audio(f, 8000), enc.clip_samples, enc.max_clips))[:, None] for f in files]
    )
    with torch.no_grad():
        old = enc(old_batch)
        new = enc(enc.collate([enc.preprocess(f) for f in files]))  # read in windows, one file at a time
    assert torch.equal(new, old)
    # embed preprocesses a batch at once (preprocess_many): the same to float rounding
    torch.testing.assert_close(enc.embed(files), old, atol=1e-5, rtol=0)


# ---- images over the pixel budget ----------------------------------------------------------------------
def test_an_image_over_the_pixel_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(path)
    assert load_image(path, 1).shape == (1, 60, 80)  # under the default budget
    monkeypatch.setenv("BINDKIT_MAX_IMAGE_PIXELS", "4000")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(InputError) as err:
        load_image(path, 1)
    message = str(err.value)
    assert message.startswith(f"image file {str(path)!r} is 80 x 60 = 4,800 pixels, over the budget of 4,000")
    assert "BINDKIT_MAX_IMAGE_PIXELS" in message and "\n" not in message
    # an opened, not yet decoded PIL image is checked the same way
    with Image.open(path) as lazy, pytest.raises(InputError, match="80 x 60 = 4,800 pixels"):
        load_image(lazy, 1)
    monkeypatch.setenv("BINDKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match=r"\$BINDKIT_MAX_IMAGE_PIXELS: expected a positive number of pixels"):
        load_image(path, 1)


def test_pils_own_decompression_bomb_error_is_the_same_one_line_input_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses past twice this
    with pytest.raises(InputError, match=f"image file {str(path)!r} is too large to decode safely") as err:
        load_image(path, 1)
    assert "\n" not in str(err.value)


def test_a_shard_image_over_the_budget_is_a_skipped_sample(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(tmp_path / "data" / "big.png")
    (tmp_path / "data" / "pairs.csv").write_text("image,text\nbig.png,a blank image\n")
    write_shards(tmp_path / "data" / "pairs.csv", tmp_path / "shards")
    monkeypatch.setenv("BINDKIT_MAX_IMAGE_PIXELS", "4000")
    items = shards(tmp_path, "train", path="shards", column="image")
    with pytest.raises(DataError, match="80 x 60 = 4,800 pixels, over the budget of 4,000"):
        items[0]


# ---- weights: shape, dtype and finiteness ---------------------------------------------------------------
def edit_weights(run: Path, name: str, value: torch.Tensor) -> None:
    weights = load_file(str(run / "model.safetensors"))
    weights[name] = value
    save_file(weights, str(run / "model.safetensors"))


def test_nan_weights_are_refused_naming_the_file_and_tensor(tmp_path):
    run = saved_model(tmp_path / "run")
    weight = load_file(str(run / "model.safetensors"))["encoders.audio.head.weight"]
    weight[3, 1], weight[0, 0] = torch.nan, torch.inf
    edit_weights(run, "encoders.audio.head.weight", weight)
    with pytest.raises(DataError) as err:
        BindModel.from_pretrained(run)
    assert str(err.value).startswith(
        f"{run / 'model.safetensors'}: tensor 'encoders.audio.head.weight' holds 2 NaN or infinite value(s) of 64"
    )


def test_weights_of_the_wrong_shape_or_kind_are_refused_naming_the_tensor(tmp_path):
    run = saved_model(tmp_path / "run")
    edit_weights(run, "encoders.audio.head.weight", torch.zeros(16, 8))
    with pytest.raises(DataError) as err:
        BindModel.from_pretrained(run)
    assert str(err.value).startswith(
        f"{run / 'model.safetensors'}: tensor 'encoders.audio.head.weight' has shape (16, 8), "
        "the model built from config.json expects (16, 4)"
    )
    run = saved_model(tmp_path / "run")
    edit_weights(run, "encoders.image.trunk.0.1.num_batches_tracked", torch.tensor(0.5))
    with pytest.raises(DataError, match="'encoders.image.trunk.0.1.num_batches_tracked' has dtype float32, .* int64"):
        BindModel.from_pretrained(run)


def test_half_precision_weights_still_load_cast_to_the_models_dtype(tmp_path):
    run = saved_model(tmp_path / "run")
    head = load_file(str(run / "model.safetensors"))["encoders.audio.head.weight"]
    edit_weights(run, "encoders.audio.head.weight", head.half())
    loaded = BindModel.from_pretrained(run)
    assert loaded["audio"].head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded["audio"].head.weight.detach(), head.half().float())


# ---- gallery embeddings and SearchIndex -----------------------------------------------------------------
def unit_rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nan_at(rows: np.ndarray, row: int) -> np.ndarray:
    rows = rows.copy()
    rows[row, 2] = np.nan
    return rows


@pytest.mark.parametrize(
    ("write", "error", "message"),
    [
        (lambda p: p.write_text("not an array"), DataError, "not a readable .npy array"),
        (lambda p: p.write_bytes(b""), DataError, "not a readable .npy array"),
        (lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object)), DataError, "not a readable .npy array"),
        (lambda p: np.savez(p.with_suffix(""), g=unit_rows(3)) or p.with_suffix(".npz").rename(p), DataError, ".npz"),
        (lambda p: np.save(p, np.ones((3, 16), np.int64)), DataError, "dtype int64; expected float32"),
        (lambda p: np.save(p, np.ones((3, 16), np.complex64)), DataError, "dtype complex64; expected float32"),
        (lambda p: np.save(p, unit_rows(3)[0]), ConfigError, r"expected \(N, 16\) embeddings.*shape \(16,\)"),
        (lambda p: np.save(p, unit_rows(3, 8)), ConfigError, r"expected \(N, 16\) embeddings.*shape \(3, 8\)"),
        (lambda p: np.save(p, nan_at(unit_rows(5), 3)), InputError, "row 3 holds NaN or infinite values"),
        (lambda p: np.save(p, unit_rows(5) * np.float32(np.inf)), InputError, "row 0 holds NaN or infinite"),
    ],
    ids=["text", "empty", "pickle", "npz", "int", "complex", "1-d", "width", "nan", "inf"],
)
def test_a_bad_gallery_file_is_one_line_naming_it(tmp_path, write, error, message):
    path = tmp_path / "gallery.npy"
    write(path)
    with pytest.raises(error, match=message) as err:
        open_gallery(path, None, 16)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_retrieve_with_a_nan_gallery_exits_with_one_line(tmp_path, capsys):
    from test_bad_input import make_run

    from bind.cli import main

    run = make_run(tmp_path / "run")
    np.save(tmp_path / "g.npy", nan_at(unit_rows(4), 1))
    argv = ["retrieve", str(run), "--query-modality", "image", "--query", str(tmp_path / "q.png")]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "q.png")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--gallery-modality", "image", "--gallery-embeddings", str(tmp_path / "g.npy")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "+nan" not in err
    assert f"{tmp_path / 'g.npy'}: row 1 holds NaN or infinite values" in err


def test_a_memory_mapped_gallery_is_checked_block_by_block(tmp_path, monkeypatch):
    np.save(tmp_path / "g.npy", nan_at(unit_rows(1000), 777))
    gallery = np.load(tmp_path / "g.npy", mmap_mode="r")
    seen = []
    real_isfinite = np.isfinite
    monkeypatch.setattr(np, "isfinite", lambda a: seen.append(a.shape) or real_isfinite(a))
    with pytest.raises(InputError, match="g.npy: row 777 holds NaN"):
        check_finite(gallery, str(tmp_path / "g.npy"), block_rows=100)
    assert seen == [(100, 16)] * 8  # blocks up to the bad one, never the whole gallery at once


def test_search_index_refuses_non_finite_galleries_and_queries_and_k_below_one(tmp_path):
    with pytest.raises(InputError, match="gallery embeddings: row 2 holds NaN"):
        SearchIndex(nan_at(unit_rows(4), 2))
    index = SearchIndex(unit_rows(4), names=list("abcd"))
    with pytest.raises(InputError, match="queries: row 0 holds NaN"):
        index.search(nan_at(unit_rows(1), 0), k=2)
    for k in (0, -1):
        with pytest.raises(ConfigError, match=f"k: expected a positive number of results per query, got {k}"):
            index.search(unit_rows(1), k=k)
    assert [name for name, _ in index.search(unit_rows(1), k=2)[0]] != []
    # a saved index whose embeddings were damaged afterwards
    saved = index.save(tmp_path / "index")
    np.save(saved / "embeddings.npy", nan_at(unit_rows(4), 1))
    with pytest.raises(InputError, match="embeddings.npy: row 1 holds NaN"):
        SearchIndex.load(saved)
    np.save(saved / "embeddings.npy", unit_rows(4))
    np.testing.assert_array_equal(load_embeddings(saved / "embeddings.npy", width=16), unit_rows(4))


# ---- a truncated tar in a streamed run --------------------------------------------------------------------
def test_a_truncated_shard_in_a_streamed_run_is_skipped_and_counted(tmp_path, caplog):
    from test_shards import make_manifest, streamed_recipe

    from bind.recipe import parse_recipe
    from bind.train.trainer import run_recipe

    paths = write_shards(make_manifest(tmp_path / "data"), tmp_path / "shards", samples_per_shard=3)
    with tarfile.open(paths[0]) as tar:
        cut = tar.getmember("000001.image.png").offset_data + 100  # inside the second sample's image
    paths[0].write_bytes(paths[0].read_bytes()[:cut])

    # reading by index (evaluation) would score fewer items than asked: it refuses, naming the shard
    with pytest.raises(DataError, match=r"shard-000000.tar: damaged tar.*stream: true"):
        shards(tmp_path, "train", path=str(tmp_path / "shards"), column="text")

    recipe = {**streamed_recipe(tmp_path / "shards", {"steps": 2}), "max_bad_fraction": 0.5}
    run_recipe(parse_recipe(recipe), tmp_path / "run", show_progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r]
    assert steps[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["bad_items"] >= 1  # the damaged shard, skipped and counted as the README says
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_fixture_files_are_left_alone():
    assert os.path.isdir(Path(__file__).parent)


# ---- manifests: each bad file is one line naming the file, the line and the column --------------------------
BIG = 1 << 20  # safe_io's bound on a line and on a CSV field
MANIFEST_CASES = {
    "not UTF-8": ("m.csv", b"text,label\nfine,a\ncaf\xe9,b\n", r"line 3: not UTF-8 text \(byte 4 of the line"),
    "a huge quoted field": (
        "m.csv",
        b'text,label\n"' + b"x\n" * (BIG // 2 + 10) + b'",a\n',
        r"line \d+: not readable as CSV \(field larger than field limit",
    ),
    "no line breaks": ("m.csv", b"text,label\n" + b"x" * (3 * BIG), r"line 2 is longer than 1 MiB"),
    "a field too many": (
        "m.csv",
        b"text,label\na,1\nb,2,3\n",
        r"line 3: 3 fields, the header names 2 columns \(text, label\)",
    ),
    "a field too few": ("m.csv", b"text,label\na,1\nb\n", r"line 3: 1 fields, the header names 2 columns"),
    "a repeated column": ("m.csv", b"text,text,label\na,b,1\n", r"line 1: the header has column 'text' twice"),
    "an empty label": ("m.csv", b"text,label\na,1\nb,\n", r"line 3: empty label"),
    "a NUL": ("m.csv", b"text,label\na\x00b,1\n", r"line 2: column 'text' holds a NUL character"),
    "an empty cell": ("m.csv", b"text,label\na,1\n,2\n", r"line 3: empty 'text'"),
    "a row that is a list": (
        "m.jsonl",
        b'{"text": "a"}\n["b"]\n',
        r"line 2: expected a JSON object \(a row: column -> value\), got list",
    ),
    "a row that is a number": ("m.jsonl", b'{"text": "a"}\n\n7\n', r"line 3: expected a JSON object"),
    "deep nesting": ("m.jsonl", b'{"text": ' + b"[" * 100_000 + b"\n", r"line 1: nested more than 64 levels deep"),
    "a nested cell": (
        "m.jsonl",
        b'{"text": {"a": "b"}}\n',
        r"line 1: column 'text': expected text, a number or null, got a dict",
    ),
    "not JSON": ("m.jsonl", b'{"text": "a"}\n{"text": \n', r"line 2: not valid JSON \(column 10: Expecting value\)"),
    "a duplicate key": ("m.jsonl", b'{"text": "a", "text": "b"}\n', r"line 1: duplicate key 'text'"),
    "a missing column": (
        "m.jsonl",
        b'{"text": "a", "label": 1}\n{"label": 2}\n',
        r"line 2: no 'text' \(line 1 has that column\)",
    ),
    "a missing label": ("m.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', r"line 2: no 'label'"),
    "a null label": ("m.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', r"line 2: empty label"),
    "an optional column left out": (
        "m.jsonl",
        b'{"text": "a", "split": "x"}\n{"text": "b"}\n',
        r"line 2: empty 'split'",
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_bad_manifest_is_one_line_naming_the_file_and_line(tmp_path, case):
    from bind.data.manifest import manifest

    name, content, message = MANIFEST_CASES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        manifest(tmp_path, "*", name, "split" if "split" in message else "text")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / name}: ") and "\n" not in text and len(text) < 400, text
    assert re.search(message, text), text


def test_a_manifest_without_line_breaks_is_refused_within_a_bounded_read(tmp_path):
    import tracemalloc

    from bind.data.manifest import read_manifest

    (tmp_path / "m.jsonl").write_bytes(b'{"text": "' + b"x" * (64 * BIG) + b'"}\n')  # one 64 MiB line
    tracemalloc.start()
    with pytest.raises(DataError, match="line 1 is longer than 1 MiB"):
        read_manifest(tmp_path / "m.jsonl")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * BIG, peak  # the first MiB (and a bit), not the line


def test_manifest_cells_of_any_json_scalar_read_as_text_and_long_digit_labels_sort_as_text(tmp_path):
    from bind.data.manifest import manifest

    rows = [{"text": 7, "label": "1" * 5000}, {"text": 2.5, "label": True}, {"text": "a", "label": "3"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = manifest(tmp_path, "*", "m.jsonl", "text", kind="text")
    assert list(items) == ["7", "2.5", "a"]
    assert items.class_names == sorted(["1" * 5000, "true", "3"])  # a 5000-digit "number" is no int: text order


# ---- shard members: bounded, never expanded, a bad label is a bad item ------------------------------------
def tar_member(name: str, data: bytes, **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def sparse_member(name: str, data: bytes, real_size: int) -> bytes:
    """A GNU sparse member: ``data`` at offset 0 of a file ``real_size`` bytes long (the rest a hole).

    tarfile writes no sparse maps, so the header is patched: one map entry and the real size, as GNU tar writes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # the map's one entry: offset 0 ...
    header[398:410] = b"%011o\0" % len(data)  # ... len(data) bytes
    header[483:495] = b"\x80" + real_size.to_bytes(11, "big")  # realsize, base-256 (past 8 GiB)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def write_shard_folder(
    folder: Path, samples: list[list], class_names: list[str] | None = None, shards: int = 1
) -> Path:
    """``samples`` (each a list of (TarInfo, bytes), or of raw header + data bytes) dealt over ``shards`` tars in
    order (the first ones to the first shard), and their index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(samples) // shards)
    entries = []
    for i in range(shards):
        part = samples[i * per_shard : (i + 1) * per_shard]
        with open(folder / f"shard-{i:06d}.tar", "wb") as f:
            for sample in part:
                for member in sample:
                    if isinstance(member, bytes):
                        f.write(member)
                    else:
                        info, data = member
                        f.write(info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512))
            f.write(b"\0" * 1024)
        entries.append({"file": f"shard-{i:06d}.tar", "samples": len(part)})
    index = {"shards": entries, "columns": {"text": ["txt"]}, "class_names": class_names}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def stream_all(folder: Path) -> tuple[list, list[int], list[tuple[str, str]]]:
    """(texts, labels, bad) of one pass over a shard folder, in order."""
    texts, labels, bad = [], [], []
    stream = ShardStream(folder, shuffle=False, shuffle_buffer=0)
    for members, label, skipped in stream.iterate(0):
        texts.append(members["text"])
        labels.append(label)
        bad += skipped
    return texts, labels, bad


BAD_LABELS = [b"abc", b"-3", b"7.5", b"99999999999999999999", b"1" * 5000, b"\xff\xfe", b"", b"12"]


def test_a_label_that_is_not_a_small_class_index_is_a_counted_bad_item(tmp_path, caplog):
    good = [
        [tar_member(f"g{i}.text.txt", f"good {i}".encode()), tar_member(f"g{i}.label.cls", b"%d\n" % i)]
        for i in range(3)
    ]
    bad = [
        [tar_member(f"b{i}.text.txt", b"bad"), tar_member(f"b{i}.label.cls", label)]
        for i, label in enumerate(BAD_LABELS)
    ]
    folder = write_shard_folder(
        tmp_path / "s", [good[0], *bad[:4], good[1], *bad[4:], good[2]], class_names=list("abcdefghij")
    )
    texts, labels, skipped = stream_all(folder)
    assert texts == ["good 0", "good 1", "good 2"] and labels == [0, 1, 2]
    assert [name for name, _ in skipped] == [f"shard-000000.tar/b{i}" for i in range(len(BAD_LABELS))]
    assert all("label.cls" in message for _, message in skipped)
    assert "12, but index.json names 10 classes" in skipped[-1][1]
    # reading by index (evaluation) scores against labels: it refuses, naming the shard and the sample
    with pytest.raises(DataError, match=r"shard-000000.tar: sample 'b0': label.cls: expected a class index"):
        shards(tmp_path, "train", path=str(folder), column="text")


def test_a_sparse_member_is_never_expanded_and_is_a_counted_bad_item(tmp_path):
    import tracemalloc

    hole = sparse_member("s0.text.txt", b"tiny", real_size=1 << 40)  # 4 bytes in the tar, 1 TiB when expanded
    good = [tar_member("g0.text.txt", b"fine"), tar_member("g0.label.cls", b"0")]
    folder = write_shard_folder(tmp_path / "s", [[hole, tar_member("s0.label.cls", b"1")], good], ["a", "b"])
    tracemalloc.start()
    texts, labels, skipped = stream_all(folder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert texts == ["fine"] and labels == [0] and peak < 4 * BIG, peak  # not 1 TiB, nor the 512 MiB cap
    assert skipped == [("shard-000000.tar/s0", "s0.text.txt: a sparse tar member (shards hold plain files)")]
    with pytest.raises(DataError, match=r"shard-000000.tar: damaged tar \(s0.text.txt: a sparse tar member"):
        shards(tmp_path, "train", path=str(folder), column="text")


def test_a_member_over_the_size_cap_is_not_read_and_is_a_counted_bad_item(tmp_path, monkeypatch):
    monkeypatch.setenv("BINDKIT_MAX_MEMBER_BYTES", "1000")
    big = [tar_member("b0.text.txt", b"x" * 5000), tar_member("b0.label.cls", b"0")]
    good = [tar_member("g0.text.txt", b"fine"), tar_member("g0.label.cls", b"1")]
    folder = write_shard_folder(tmp_path / "s", [big, good], ["a", "b"])
    texts, labels, skipped = stream_all(folder)
    assert texts == ["fine"] and labels == [1]
    assert skipped == [
        (
            "shard-000000.tar/b0",
            "b0.text.txt: 4.883 KiB, over the 1000 bytes a member may have ($BINDKIT_MAX_MEMBER_BYTES)",
        )
    ]
    monkeypatch.setenv("BINDKIT_MAX_MEMBER_BYTES", "-1")
    with pytest.raises(ConfigError, match=r"\$BINDKIT_MAX_MEMBER_BYTES: expected a positive number of bytes, got '-1'"):
        stream_all(folder)


@pytest.mark.parametrize("size", [100 << 30, 1 << 62])
def test_a_member_whose_header_lies_about_its_size_is_skipped_at_once(tmp_path, size):
    """A header that promises 100 GiB or 4 EiB in a short file: refused unread, and skipping it is one seek (a tar
    stream would read its way through them a block at a time: a hang); past the file's end the shard ends, its
    missing samples counted."""
    liar, _ = tar_member("l0.text.txt", b"")
    liar.size = size
    header = liar.tobuf(tarfile.GNU_FORMAT)
    good = [[tar_member(f"g{i}.text.txt", b"fine %d" % i), tar_member(f"g{i}.label.cls", b"%d" % i)] for i in range(2)]
    folder = write_shard_folder(tmp_path / "s", [good[0], [header + b"x" * 512], good[1]], shards=2)
    start = time.monotonic()
    texts, labels, skipped = stream_all(folder)
    assert time.monotonic() - start < 5
    assert texts == ["fine 0", "fine 1"] and labels == [0, 1]  # the other shard is read whole
    assert len(skipped) == 1 and skipped[0][0] == "shard-000000.tar", skipped
    assert skipped[0][1].startswith("damaged tar: 1 of 2 samples read"), skipped


def test_an_npy_member_whose_header_declares_a_terabyte_is_a_bad_item_not_an_allocation(tmp_path):
    import io

    from bind.data.decoders import decode
    from bind.data.pairs import BadItem

    lying = io.BytesIO()
    np.lib.format.write_array_header_1_0(lying, {"descr": "<f4", "fortran_order": False, "shape": (1 << 38,)})
    lying.write(b"\0" * 16)  # 2**38 floats (1 TiB) declared, 16 bytes held
    with pytest.raises(BadItem, match=r"x.npy: cannot decode .npy \(ValueError: the header declares \(274877906944,\)"):
        decode("npy", lying.getvalue(), "x.npy")
    raw = io.BytesIO()
    np.save(raw, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(decode("npy", raw.getvalue(), "x.npy"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"shards": {}, "columns": {}}', r"shards: expected a list of \{file, samples\}, got \{\}"),
        ('{"shards": [{"file": "a.tar", "samples": "3"}], "columns": {}}', r"shards\[0\].samples: expected a count"),
        (
            '{"shards": [], "columns": {"text": "txt"}}',
            r"columns: expected a mapping of column -> list of file extensions",
        ),
        (
            '{"shards": [], "columns": {}, "class_names": {"a": 1}}',
            r"class_names: expected a list of class names or null",
        ),
        ('{"shards": [], "columns": {}, "columns": {}}', r"duplicate key 'columns'"),
        ("[" * 100_000, r"nested more than 64 levels deep"),
        ("[]", r"\(top level\): expected a JSON object"),
    ],
)
def test_a_malformed_shard_index_is_one_line_naming_it_and_the_key(tmp_path, index, message):
    (tmp_path / "index.json").write_text(index)
    with pytest.raises(DataError) as err:
        ShardIndex.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'index.json'}: ") and "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)
