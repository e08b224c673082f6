"""Files from a stranger: paths that leave their folder, inputs too large to read whole, damaged numbers.

One test per row of the "Trust boundaries and crash safety" issue: a run's config.json or a shard index
naming files outside its folder, an hour of audio or a huge image, NaN or mis-shaped weights, bad gallery
embeddings, and a truncated tar in a streamed run. Each is refused with one line naming the file and key,
or (long audio, damaged shards) handled within bounded memory without stopping the run.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from bind import ConfigError, DataError, InputError, create_encoder
from bind.cli.retrieve import _load_gallery
from bind.data.shard_stream import ShardStream
from bind.data.shard_writer import write_shards
from bind.data.shards import ShardIndex, shards
from bind.model import BindModel
from bind.retrieval import SearchIndex, check_finite, load_embeddings
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
    new = enc.embed(files)
    old_batch = enc.collate(
        [enc.frontend(*split_clips(load_audio(f, 8000), enc.clip_samples, enc.max_clips))[:, None] for f in files]
    )
    with torch.no_grad():
        old = enc(old_batch)
    assert torch.equal(new, old)


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
        _load_gallery(str(path), None, 16)
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
    from bind.trainer import run_recipe

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
