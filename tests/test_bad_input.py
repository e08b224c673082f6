"""Bad input gets a clear answer: a bindkit exception naming the file or key, what was expected, what to do.

One test per case of the "Reliability" issue; the CLI tests check that the same errors print as at most two
lines on stderr without a traceback (``--debug`` shows it) and exit non-zero.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import imu_plugin  # noqa: F401  (registers imu_test_cnn)
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image

from bind import ConfigError, DataError, InputError, UnknownEncoderError, create_encoder, get_encoder_info
from bind import registry as registry_module
from bind.cli import main
from bind.cli._inputs import read_inputs
from bind.model import FORMAT_VERSION, BindModel
from bind.recipe import load_recipe
from bind.runs import load_run
from encoders.audio_io import load_audio
from encoders.image_io import load_image
from encoders.video_io import read_video, write_video

TESTS = Path(__file__).parent
RNG = np.random.default_rng(0)
AUDIO_ARGS = {"embed_dim": 16, "width": 4, "depth": 2, "n_mels": 16, "clip_seconds": 0.5}


def tiny(name: str, tmp_path: Path, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides}).eval()


def audio_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder("audio_cnn", **AUDIO_ARGS).eval()


def png_bytes(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """16-bit PCM: a 44-byte header, then 2 bytes per sample."""
    buffer = io.BytesIO()
    wave = np.random.default_rng(2).standard_normal(round(seconds * rate)) * 0.1
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---- image files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", lambda: b"", r"is empty \(0 bytes\); expected a PNG or JPEG"),
        ("cut.png", lambda: first_half(png_bytes()), "corrupt.*truncated.*expected a PNG or JPEG"),
        ("notes.jpg", lambda: b"a text file, renamed", "not an image PIL can read.*expected a PNG or JPEG"),
        ("sound.png", wav_bytes, "not an image PIL can read.*expected a PNG or JPEG"),
    ],
)
def test_corrupt_empty_truncated_or_unsupported_image_file_names_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(InputError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value)
    # through an encoder, as training and `bindkit embed` reach it
    with pytest.raises(InputError, match=name):
        create_encoder("digits_cnn", width=4, embed_dim=8).embed([path])


# ---- audio files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.wav", lambda: b"", r"is empty \(0 bytes\)"),
        ("noise.wav", lambda: RNG.bytes(4000), "could not be decoded.*expected a WAV or FLAC"),
        ("cut.wav", lambda: wav_bytes()[:3000], "is truncated: its header promises 5044 more bytes"),  # 8044 - 3000
        ("image.wav", png_bytes, "could not be decoded.*convert it"),
    ],
)
def test_corrupt_empty_truncated_or_unsupported_audio_file_names_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(InputError, match=message) as err:
        load_audio(path, 8000)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match=name):
        audio_encoder().embed([path])


def test_audio_at_any_sample_rate_and_channel_count_is_resampled_and_mixed_down(tmp_path):
    left, right = (RNG.standard_normal((2, 4000)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "stereo8k.wav", np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(tmp_path / "stereo8k.wav", 8000), torch.from_numpy((left + right) / 2))
    cases = {"44k_stereo.wav": (44100, 2), "8k_mono.wav": (8000, 1), "22k_32ch.wav": (22050, 32), "odd.wav": (44101, 1)}
    for name, (rate, channels) in cases.items():
        sf.write(tmp_path / name, (RNG.standard_normal((rate // 2, channels)) * 0.1).astype(np.float32), rate)
    # half a second at any rate becomes ~4000 samples at 8 kHz; 44101 Hz is approximated to within 0.05%
    lengths = {name: load_audio(tmp_path / name, 8000).shape[0] for name in cases}
    assert all(abs(n - 4000) <= 2 for n in lengths.values()), lengths
    z = audio_encoder().embed([tmp_path / name for name in cases])
    assert z.shape == (4, 16) and torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("name", ["audio_cnn", "audio_vit"])
def test_silent_or_very_short_audio_is_padded_to_a_clip_and_embeds_finite(tmp_path, name):
    enc = tiny(name, tmp_path)
    clip = enc.preprocess(RNG.standard_normal(enc.clip_samples).astype(np.float32) * 0.1)
    sf.write(tmp_path / "silent_10ms.wav", np.zeros(80, np.float32), 8000)
    items = [
        np.zeros(enc.clip_samples, np.float32),  # silence: normalising by its std must not divide by zero
        RNG.standard_normal(enc.frontend.sample_rate // 100).astype(np.float32),  # 10 ms
        np.full(1, 0.5, np.float32),  # one sample
        tmp_path / "silent_10ms.wav",  # 10 ms of silence at another rate
    ]
    for item in items:
        x = enc.preprocess(item)
        assert x.shape == clip.shape and torch.isfinite(x).all()
    z = enc.embed(items)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(len(items)))


# ---- video files ---------------------------------------------------------------------------------------
def mp4_bytes(tmp_path: Path) -> bytes:
    return write_video(tmp_path / "whole.mp4", RNG.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)).read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.mp4", lambda tmp: b"", r"is empty \(0 bytes\)"),
        ("cut.mp4", lambda tmp: first_half(mp4_bytes(tmp)), "could not be decoded.*truncated"),
        ("notes.mp4", lambda tmp: b"a text file, renamed" * 50, "could not be decoded.*really a video"),
        ("sound.mkv", lambda tmp: wav_bytes(), "has no video stream"),
    ],
)
def test_corrupt_empty_truncated_or_unsupported_video_file_names_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    with pytest.raises(InputError, match=message) as err:
        read_video(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match=name):
        tiny("video_frames", tmp_path).embed([path])


# ---- arrays and text -----------------------------------------------------------------------------------
def test_nan_or_inf_in_array_inputs_names_what_was_passed(tmp_path):
    image = RNG.random((28, 28), dtype=np.float32)
    image[3, 4] = np.nan
    with pytest.raises(InputError, match=r"image array of shape \(28, 28\) holds NaN or inf"):
        create_encoder("digits_cnn", width=4, embed_dim=8).embed([image])
    with pytest.raises(InputError, match=r"image tensor of shape \(1, 4, 4\) holds NaN or inf"):
        load_image(torch.full((1, 4, 4), float("inf")))
    wave = np.zeros(800, np.float32)
    wave[10] = np.inf
    with pytest.raises(InputError, match="audio array contains NaN or infinite samples"):
        audio_encoder().embed([wave])
    with pytest.raises(InputError, match=r"\(waveform, sample_rate\) item contains NaN"):
        load_audio((np.full(800, np.nan), 16000), 8000)
    sf.write(tmp_path / "nan.wav", np.full(800, np.nan, np.float32), 8000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"nan\.wav' contains NaN"):
        load_audio(tmp_path / "nan.wav", 8000)
    frames = RNG.random((4, 28, 28), dtype=np.float32)
    frames[2, 0, 0] = np.nan
    with pytest.raises(InputError, match="video frame 2: image array .* holds NaN"):
        tiny("video_frames", tmp_path).embed([frames])


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_or_whitespace_text_is_an_input_error(tmp_path, text):
    enc = tiny("hf_text", tmp_path)
    with pytest.raises(InputError, match="text is empty or only whitespace.*expected at least one word") as err:
        enc.embed(["a handwritten seven", text])
    assert repr(text) in str(err.value)


# ---- names, dimensions, paths and keys -----------------------------------------------------------------
def test_unknown_encoder_and_modality_names_suggest_close_matches():
    with pytest.raises(UnknownEncoderError, match="unknown encoder 'digit_cnn'; did you mean 'digits_cnn'"):
        create_encoder("digit_cnn")
    model = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=8)}, anchor_modality="image")
    with pytest.raises(ConfigError, match="no modality 'imgae'; did you mean 'image'\\? the model has: image"):
        model.embed("imgae", [])
    with pytest.raises(ConfigError, match="anchor_modality 'audio' has no encoder"):
        BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=8)}, anchor_modality="audio")


def test_encoders_whose_embed_dims_disagree_name_both_modalities_and_dims():
    encoders = {"image": create_encoder("digits_cnn", width=4, embed_dim=8), "audio": audio_encoder()}
    with pytest.raises(ConfigError, match="share one embed_dim.*'image': 8, 'audio': 16.*same embed_dim"):
        BindModel(encoders, anchor_modality="image")


def test_missing_data_paths_name_the_path(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["modalities"]["image"]["train_data"]["args"]["path"] = "nowhere.csv"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(DataError, match=f"train_data: {tmp_path / 'nowhere.csv'} not found.*point data_root"):
        load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(DataError, match="gone.wav: file not found; expected the path of an existing audio file"):
        read_inputs(BindModel({"audio": audio_encoder()}, "audio"), "audio", [str(tmp_path / "gone.wav")])
    with pytest.raises(InputError, match="gone.png' does not exist"):
        load_image(tmp_path / "gone.png")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("embed_dim", "big", "embed_dim: expected int, got 'big'"),
        ("stages.0.steps", [1], r"stages\[0\].steps: expected int or null, got \[1\]"),
        ("modalities.image.freeze", 3, "modalities.image.freeze: expected 'none' or 'trunk' or 'all', got 3"),
    ],
)
def test_recipe_keys_with_wrong_types_name_the_key(tmp_path, key, value, message):
    recipe = tiny_recipe(tmp_path)
    *parents, last = key.split(".")
    node = recipe
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(tmp_path / "recipe.yaml")
    assert str(tmp_path / "recipe.yaml") in str(err.value)


# ---- run directories ------------------------------------------------------------------------------------
def tiny_recipe(root: Path) -> dict:
    """A recipe that validates without real data: image items come from a one-row manifest under ``root``."""
    (root / "pairs.csv").write_text("image\na.png\n")
    image_data = {"source": "manifest", "args": {"path": "pairs.csv", "column": "image"}}
    return {
        "anchor_modality": "image",
        "embed_dim": 16,
        "data_root": str(root),
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": image_data},
            "audio": {"encoder": "audio_cnn", "args": {k: v for k, v in AUDIO_ARGS.items() if k != "embed_dim"}},
        },
        "stages": [{"name": "image", "kind": "pretrain", "modality": "image", "steps": 1}],
    }


def make_run(run_dir: Path) -> Path:
    """A run directory as `bindkit run` leaves it: recipe.yaml, config.json, model.safetensors."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(run_dir)))
    torch.manual_seed(0)
    encoders = {"image": create_encoder("digits_cnn", width=4, embed_dim=16), "audio": audio_encoder()}
    BindModel(encoders, anchor_modality="image").save_pretrained(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def test_a_complete_run_directory_loads(run_dir):
    model, recipe = load_run(run_dir)
    assert model.modalities == ["image", "audio"] and recipe.embed_dim == 16


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_an_incomplete_run_directory_names_the_missing_file_and_what_writes_it(tmp_path, missing):
    run = make_run(tmp_path / "run")
    (run / missing).unlink()
    with pytest.raises(DataError, match=f"{missing} is missing: the run in .* is incomplete .*`bindkit run`") as err:
        load_run(run)
    assert str(run / missing) in str(err.value)
    (run / "recipe.yaml").unlink()
    with pytest.raises(DataError, match=f"{missing} is missing: the model folder .*save_pretrained"):
        load_run(run)
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load_run(tmp_path / "nowhere")


def test_a_run_without_its_recipe_is_a_model_folder(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "model")
    (tmp_path / "model" / "recipe.yaml").unlink()
    model, recipe = load_run(tmp_path / "model")
    assert recipe is None and model.modalities == ["image", "audio"]


def test_truncated_weights_in_a_run_directory_name_the_file(tmp_path):
    run = make_run(tmp_path / "run")
    weights = run / "model.safetensors"
    weights.write_bytes(first_half(weights.read_bytes()))
    with pytest.raises(DataError, match="model.safetensors: not a readable safetensors file.*truncated or corrupt"):
        load_run(run)


def test_a_run_from_a_newer_format_says_to_upgrade_bindkit(tmp_path):
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config.json: model format_version {FORMAT_VERSION + 1} .*upgrade bindkit"):
        load_run(run)
    (run / "config.json").write_text(json.dumps({**config, "format_version": "one"}))
    with pytest.raises(ConfigError, match="config.json: format_version: expected an integer, got 'one'"):
        load_run(run)
    (run / "config.json").write_text("{ not json")
    with pytest.raises(
        ConfigError, match="config.json: not valid JSON .*expected a model config written by BindModel.save_pretrained"
    ):
        load_run(run)


def imu_model() -> BindModel:
    torch.manual_seed(0)
    encoders = {
        "image": create_encoder("digits_cnn", width=4, embed_dim=16),
        "imu": create_encoder("imu_test_cnn", width=8, embed_dim=16),
    }
    return BindModel(encoders, anchor_modality="image")


def test_a_checkpoint_naming_an_unregistered_encoder_names_it_and_the_plugin_that_provides_it(tmp_path, monkeypatch):
    imu_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["encoder_modules"] == {"digits_cnn": "encoders.image", "imu_test_cnn": "imu_plugin"}
    monkeypatch.delitem(registry_module._REGISTRY, "imu_test_cnn")  # as in a process that never imported it
    with pytest.raises(UnknownEncoderError, match="the 'imu' encoder 'imu_test_cnn' is not registered") as err:
        BindModel.from_pretrained(tmp_path)
    assert "--plugin imu_plugin" in str(err.value) and str(tmp_path / "config.json") in str(err.value)
    assert err.value.name == "imu_test_cnn"
    # configs written before encoder_modules existed still get an answer, with MODULE as a placeholder
    del config["encoder_modules"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownEncoderError, match="'imu_test_cnn' is not registered.*--plugin MODULE"):
        BindModel.from_pretrained(tmp_path)
    monkeypatch.undo()
    assert BindModel.from_pretrained(tmp_path).modalities == ["image", "imu"]


def test_an_unregistered_frame_encoder_inside_a_video_encoder_is_named_too(tmp_path, monkeypatch):
    model = BindModel({"video": tiny("video_frames", tmp_path)}, anchor_modality="video")
    model.save_pretrained(tmp_path)
    assert model.config()["encoder_modules"] == {"digits_cnn": "encoders.image", "video_frames": "encoders.video"}
    monkeypatch.delitem(registry_module._REGISTRY, "digits_cnn")
    with pytest.raises(UnknownEncoderError, match="'video_frames' needs encoder 'digits_cnn', which is not registered"):
        BindModel.from_pretrained(tmp_path)


# ---- the command line -----------------------------------------------------------------------------------
def bindkit_in_process(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``bindkit ARGS``, run in this process (fast: torch is already imported)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_clear_error(code: int, stderr: str, *expected: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, stderr
    for text in expected:
        assert text in stderr, (text, stderr)


def test_cli_embed_on_a_corrupt_file_is_one_clear_line(run_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(RNG.bytes(3000))
    code, err = bindkit_in_process(
        capsys, "embed", run_dir, "--modality", "audio", "--out", tmp_path / "z.npy", corrupt
    )
    assert_one_clear_error(code, err, "bindkit embed: error:", str(corrupt), "expected a WAV or FLAC file")
    assert not (tmp_path / "z.npy").exists()
    sound = tmp_path / "ok.wav"
    sound.write_bytes(wav_bytes())
    out = tmp_path / "no_such_folder" / "z.npy"  # an OSError, not a bindkit error: named all the same
    code, err = bindkit_in_process(capsys, "embed", run_dir, "--modality", "audio", "--out", out, sound)
    assert_one_clear_error(code, err, str(out), "No such file or directory")
    code, err = bindkit_in_process(capsys, "embed", run_dir, "--modality", "audoi", "--out", out, sound)
    assert_one_clear_error(code, err, "no modality 'audoi'; did you mean 'audio'? the model has:")


def test_cli_eval_on_an_incomplete_run_directory_is_one_clear_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "model.safetensors").unlink()
    code, err = bindkit_in_process(capsys, "eval", run)
    assert_one_clear_error(code, err, "bindkit eval: error:", str(run / "model.safetensors"), "`bindkit run`")


def test_cli_validate_on_a_wrong_typed_key_is_one_clear_line(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    recipe["embed_dim"] = "big"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, err = bindkit_in_process(capsys, "validate", tmp_path / "recipe.yaml")
    assert_one_clear_error(code, err, f"{tmp_path / 'recipe.yaml'}: embed_dim: expected int, got 'big'")
    (tmp_path / "broken.yaml").write_text("modalities: [image\nstages: 2\n")  # YAML errors quote several lines
    code, err = bindkit_in_process(capsys, "validate", tmp_path / "broken.yaml")
    assert_one_clear_error(code, err, str(tmp_path / "broken.yaml"), "not valid YAML")


def test_cli_unknown_modality_suggests_a_close_match(capsys):
    code, err = bindkit_in_process(capsys, "encoders", "--modality", "vidoe")
    assert_one_clear_error(code, err, "no encoder is registered for 'vidoe'; did you mean 'video'?")


def test_cli_shows_the_traceback_only_with_debug(run_dir, tmp_path):
    """As a user runs it: a separate process, so that nothing pytest catches can hide a traceback."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes()[:100])
    args = ["embed", str(run_dir), "--modality", "image", "--out", str(tmp_path / "z.npy"), str(corrupt)]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    plain, debug = (
        subprocess.run([sys.executable, "-m", "bind", *flags, *args], capture_output=True, text=True, env=env)
        for flags in ([], ["--debug"])
    )
    assert_one_clear_error(plain.returncode, plain.stderr, str(corrupt), "expected a PNG or JPEG file")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "bind.errors.InputError" in debug.stderr and str(corrupt) in debug.stderr


def test_a_run_moved_to_a_machine_without_its_data_still_loads_and_eval_names_the_missing_data(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "pairs.csv").unlink()  # the training manifest is gone: a copied run directory
    model, _ = load_run(run)  # embedding and retrieval need only the model
    assert model.embed("image", [np.zeros((28, 28), np.uint8)]).shape == (1, 16)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["modalities"]["image"]["eval_data"] = copy.deepcopy(recipe["modalities"]["image"]["train_data"])  # no alias
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, err = bindkit_in_process(capsys, "eval", run)
    assert_one_clear_error(code, err, "modalities.image.eval_data", "pairs.csv not found")
