"""Recipes: every shipped recipe validates; each kind of mistake names the file, the key and what was expected."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from bind import ConfigError, DataError, UnknownEncoderError
from bind.cli import main
from bind.recipe import load_recipe, set_override
from encoders.imagebind import save_tiny_checkpoint

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


# recipes on the user's own data: validated on stand-ins of it in tests/test_hub_recipes.py
USER_DATA = {"imagebind_extend.yaml": "shards/train/index.json"}
IMAGEBIND_WEIGHTS = ".checkpoints/imagebind_huge.pth"  # where the recipes look for ImageBind's released weights


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_starts_with_its_command(path, data_root, tmp_path):
    assert path.read_text().splitlines()[0].startswith(f"# bindkit run recipes/{path.name}")
    modalities = yaml.safe_load(path.read_text())["modalities"]
    weights = [m for m, spec in modalities.items() if (spec.get("args") or {}).get("checkpoint") == IMAGEBIND_WEIGHTS]
    overrides = []
    if weights:  # without ImageBind's 4.5 GB: the line a newcomer gets names the key and the download
        with pytest.raises(DataError) as refusal:
            load_recipe(path, [f"data_root={data_root}"])
        assert str(refusal.value) == (
            f"{path}: modalities.{weights[0]}.args.checkpoint: {IMAGEBIND_WEIGHTS} does not exist; download "
            "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
        )
        stand_in = save_tiny_checkpoint(tmp_path / "imagebind_tiny.pth")  # what validate reads: a file in its place
        overrides = [f"modalities.{m}.args.checkpoint={stand_in}" for m in weights]
    if path.name in USER_DATA:  # without the user's data: the line a newcomer gets says what to put where
        with pytest.raises(
            DataError, match=f"{USER_DATA[path.name]} not found. Put the data there, or point data_root"
        ):
            load_recipe(path, [f"data_root={tmp_path}", *overrides])
        return
    assert load_recipe(path, [f"data_root={data_root}", *overrides]).modalities


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(tmp_path) -> dict:
    return {
        "anchor_modality": "image",
        "data_root": str(tmp_path),
        "modalities": {"image": {"encoder": "digits_cnn", "train_data": {"source": "digit_captions"}}},
        "stages": [{"name": "s", "kind": "pretrain", "modality": "image", "steps": 2}],
    }


def test_minimal_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, minimal(tmp_path)))
    assert recipe.embed_dim == 128 and recipe.stages[0].optimizer.lr == 1e-3


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda d: d["stages"][0].update(stepz=3),
            ConfigError,
            r"r.yaml: stages\[0\].stepz: unknown key \(did you mean 'steps'\?\)",
        ),
        (
            lambda d: d["stages"][0].update(steps="many"),
            ConfigError,
            r"stages\[0\].steps: expected int or null, got 'many'",
        ),
        (
            lambda d: d["stages"][0].update(kind="finetune"),
            ConfigError,
            r"kind: expected 'pretrain' or 'bind', got 'finetune'",
        ),
        (
            lambda d: d["modalities"]["image"].update(encoder="digit_cnn"),
            UnknownEncoderError,
            "did you mean 'digits_cnn'",
        ),
        (
            lambda d: d["modalities"]["image"].update(args={"widht": 3}),
            ConfigError,
            r"modalities.image.args: .*does not take argument\(s\) widht",
        ),
        (
            lambda d: d["modalities"]["image"].update(encoder="minilm"),
            ConfigError,
            "'minilm' is a 'text' encoder, not 'image'",
        ),
        (
            lambda d: d["modalities"]["image"]["train_data"].update(source="mnist"),
            DataError,
            r"mnist/images-idx3-ubyte.gz not found.*BINDKIT_DATA",
        ),
        (lambda d: d["stages"][0].update(epochs=1), ConfigError, "give exactly one of epochs or steps"),
        (lambda d: d.update(anchor_modality="audio"), ConfigError, "anchor_modality 'audio' is not under modalities"),
    ],
)
def test_mistakes_name_the_key_and_what_was_expected(tmp_path, change, error, message):
    data = minimal(tmp_path)
    change(data)
    with pytest.raises(error, match=message):
        load_recipe(write(tmp_path, data))


def test_overrides_set_nested_keys_and_list_items():
    data = {"a": {"b": 1}, "stages": [{"epochs": 3}]}
    set_override(data, "a.b=2.5")
    set_override(data, "stages.0.epochs=1")
    set_override(data, "new.key=[1, 2]")
    assert data == {"a": {"b": 2.5}, "stages": [{"epochs": 1}], "new": {"key": [1, 2]}}
    with pytest.raises(ConfigError, match="stages has no item 5"):
        set_override(data, "stages.5.epochs=1")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        set_override(data, "stages")


# ---- values: each number has a range, each mistake names its key --------------------------------------------
def bind_recipe(tmp_path) -> dict:
    """``minimal`` plus an audio modality and a bind stage that pairs it with the image anchor."""
    data = minimal(tmp_path)
    data["modalities"]["audio"] = {"encoder": "audio_cnn", "train_data": {"source": "digit_captions"}}
    data["stages"][0]["optimizer"] = {"lr": 1e-3}
    data["stages"].append({"name": "b", "kind": "bind", "pairs": {"audio": {"batch_size": 8}}, "steps": 2})
    return data


def validate(capsys, path: Path, *overrides: str) -> tuple[int, str]:
    """Exit status and stderr of ``bindkit validate PATH OVERRIDES``, in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path), *overrides])
    return exit_info.value.code, capsys.readouterr().err


def set_key(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[int(part)] if part.isdigit() else data[part]
    data[int(last) if last.isdigit() else last] = value


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("embed_dim", -4, "embed_dim: expected a positive integer, got -4"),
        ("stages.0.batch_size", 0, "stages[0].batch_size: expected a positive integer, got 0"),
        ("stages.1.pairs.audio.batch_size", 0, "stages[1].pairs.audio.batch_size: expected a positive integer, got 0"),
        ("stages.0.optimizer.lr", -1, "stages[0].optimizer.lr: expected a positive number, got -1.0"),
        ("stages.0.optimizer.lr", math.nan, "stages[0].optimizer.lr: expected a finite number, got nan"),
        ("stages.0.optimizer.lr", "nan", "stages[0].optimizer.lr: expected a finite number, got 'nan'"),
        ("stages.0.optimizer.lr", "1e999", "stages[0].optimizer.lr: expected a finite number, got '1e999'"),
        ("stages.0.optimizer.weight_decay", -0.1, "stages[0].optimizer.weight_decay: expected a number >= 0, got -0.1"),
        ("stages.0.optimizer.min_lr_ratio", 1.5, "min_lr_ratio: expected a number between 0 and 1, got 1.5"),
        ("stages.0.optimizer.betas", [0.9, 1.0], r"optimizer.betas[1]: expected a number in [0, 1), got 1.0"),
        ("stages.0.optimizer.warmup_steps", -1, "stages[0].optimizer.warmup_steps: expected an integer >= 0, got -1"),
        ("stages.0.optimizer.grad_clip", 0, "grad_clip: expected a positive number or null, got 0.0"),
        ("stages.0.optimizer.grad_clip", math.inf, "grad_clip: expected a finite number, got inf"),
        ("stages.0.optimizer.grad_accum_steps", 0, "grad_accum_steps: expected a positive integer, got 0"),
        ("stages.0.steps", -5, "stages[0].steps: expected a positive integer or null, got -5"),
        ("stages.0.epochs", 0, "stages[0].epochs: expected a positive number or null, got 0.0"),
        ("stages.0.epochs", -math.inf, "stages[0].epochs: expected a finite number, got -inf"),
        ("stages.0.temperature", 0, "stages[0].temperature: expected a positive number, got 0.0"),
        ("stages.0.log_every", 0, "stages[0].log_every: expected a positive integer, got 0"),
        ("stages.0.chunk_size", 0, "stages[0].chunk_size: expected a positive integer or null, got 0"),
        ("stages.1.pairs.audio.weight", -1, "stages[1].pairs.audio.weight: expected a number >= 0, got -1.0"),
        ("stages.1.pairs.audio.weight", math.nan, "stages[1].pairs.audio.weight: expected a finite number, got nan"),
        ("num_workers", -1, "num_workers: expected an integer >= 0, got -1"),
        ("seed", -1, "seed: expected an integer in [0, 2**32) (NumPy's seed range), got -1"),
        ("seed", 2**32, "seed: expected an integer in [0, 2**32) (NumPy's seed range), got 4294967296"),
        ("keep_checkpoints", 0, "keep_checkpoints: expected a positive integer, got 0"),
        ("checkpoint_every", 0, "checkpoint_every: expected a positive integer or null, got 0"),
        ("max_nonfinite_steps", 0, "max_nonfinite_steps: expected a positive integer, got 0"),
        ("max_bad_fraction", 1.5, "max_bad_fraction: expected a number between 0 and 1, got 1.5"),
        ("eval", {"max_items": 0}, "eval.max_items: expected a positive integer or null, got 0"),
        ("modalities.image.train_data.shuffle_buffer", 0, "train_data.shuffle_buffer: expected a positive integer"),
        ("modalities.image.unfreeze_last_blocks", -1, "image.unfreeze_last_blocks: expected an integer >= 0, got -1"),
        ("modalities.image.lora", {"alpha": 0}, "modalities.image.lora.alpha: expected a positive number, got 0.0"),
        ("modalities.image.lora", {"dropout": 1}, "lora.dropout: expected a probability in [0, 1), got 1.0"),
        (
            "modalities.image.args",
            {"width": math.nan},
            "modalities.image.args.width: expected a finite number, got nan",
        ),
        ("modalities.image.args", {"width": b"\x00"}, "modalities.image.args.width: expected text, a number, a list"),
        ("modalities.image.args", {3: 1}, "modalities.image.args.3: expected a name (printable text) as key, got 3"),
        ("stages.0.name", "two\nlines", "stages[0].name: expected printable text (no line breaks"),
    ],
)
def test_a_value_out_of_range_is_refused_by_validate_naming_the_key(tmp_path, capsys, key, value, message):
    data = bind_recipe(tmp_path)
    set_key(data, key, value)
    path = write(tmp_path, data)
    code, err = validate(capsys, path)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and message in err, err
    assert load_recipe(write(tmp_path, bind_recipe(tmp_path)))  # the same recipe without the mistake is fine


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["stages"][1]["pairs"]["audio"].update(weight=0),
            r"stages\[1\] \(b\)\.pairs: expected at least one positive weight, got audio: 0\.0",
        ),
        (
            lambda d: d["modalities"]["image"].update(unfreeze_last_blocks=1),
            "modalities.image.unfreeze_last_blocks: applies with freeze: trunk only, got freeze 'none'",
        ),
        (
            lambda d: d["modalities"]["image"].update(freeze="all"),
            r"stages\[0\] \(s\): nothing would train: image frozen 'all'",
        ),
        (
            lambda d: d["stages"][1].update(freeze={"audio": "all"}),
            r"stages\[1\] \(b\): nothing would train: image, audio frozen 'all'",
        ),
        (
            lambda d: d["modalities"].update(
                text={"encoder": "minilm", "train_data": {"source": "digit_captions", "augment": {"shift": 0.1}}}
            ),
            "modalities.text.train_data.augment: encoder 'minilm' defines no augmentation",
        ),
        (
            lambda d: d["modalities"]["image"]["train_data"].update(augment={"scale": [2, 1]}),
            r"modalities.image.train_data.augment: scale must be a range \[low, high\] with 0 < low <= high",
        ),
        (
            lambda d: d.update(eval={"sets": {"big": {"depth": {"source": "mnist", "split": "eval"}}}}),
            r"eval.sets.big.depth: expected a modality of the recipe \(audio, image\), got .depth.",
        ),
        (
            lambda d: d.update(eval={"sets": {"big": {"image": {"source": "mnist", "augment": {"scale": [1, 2]}}}}}),
            "eval.sets.big.image: evaluation reads by index, unaugmented; drop stream and augment there",
        ),
        (
            lambda d: d["modalities"]["audio"]["train_data"].update(augment={"speed": "fast"}),
            "modalities.audio.train_data.augment.speed: expected a list or null, got 'fast'",
        ),
        (
            lambda d: d["modalities"]["audio"]["train_data"].update(augment={"sped": [1, 2]}),
            r"modalities.audio.train_data.augment.sped: unknown key \(did you mean 'speed'\?\)",
        ),
        (lambda d: d["modalities"]["image"].update(encoder="digit_cnn"), "modalities.image.encoder: unknown encoder"),
    ],
)
def test_rules_across_keys_are_checked_by_validate_too(tmp_path, change, message):
    data = bind_recipe(tmp_path)
    change(data)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(write(tmp_path, data))
    assert str(tmp_path / "r.yaml") in str(err.value)


# ---- files that are no recipe ---------------------------------------------------------------------------------
def alias_bomb(tmp_path) -> Path:
    """A valid recipe with a "billion laughs" under augment: 9 levels of 9 aliases, 9**9 strings once expanded."""
    lines = yaml.safe_dump(minimal(tmp_path)).replace(
        "source: digit_captions", "source: digit_captions\n      augment:"
    )
    bomb = ["        a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"        {b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    at = lines.index("augment:\n") + len("augment:\n")
    path = tmp_path / "bomb.yaml"
    path.write_text(lines[:at] + "\n".join(bomb) + "\n" + lines[at:])
    return path


def test_a_yaml_alias_bomb_is_refused_at_its_first_anchor_without_expanding_it(tmp_path, capsys):
    path = alias_bomb(tmp_path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "&a" in text)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}: line {line}: YAML anchor or alias &a: a recipe may not use them; write the value out "
        "(PyYAML writes them for objects used twice: dump a copy, e.g. json.loads(json.dumps(data)))"
    )
    assert time.monotonic() - start < 60  # loose: it must finish at all (it took GBs and forever before)
    code, stderr = validate(capsys, path)
    assert code == 2 and stderr.strip() == f"bindkit validate: error: {err.value}"
    # aliases alone (an anchor-less alias is a YAML error too) and in an override are refused the same way
    (tmp_path / "alias.yaml").write_text("seed: *x\n")
    with pytest.raises(ConfigError, match=r"alias.yaml: line 1: YAML anchor or alias \*x"):
        load_recipe(tmp_path / "alias.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml: command line: override 'eval': line 1: YAML anchor or alias &e"):
        load_recipe(write(tmp_path, minimal(tmp_path)), ["eval=&e {max_items: 2}"])


def png_bytes() -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))


@pytest.mark.parametrize(
    "content, message",
    [
        (png_bytes(), r"not a text file \(byte 0 is not UTF-8\); a recipe is a YAML text file"),
        ("seed: 0\nname: café\n".encode("latin-1"), r"not a text file \(byte 17 is not UTF-8\)"),
        (b"seed: 0\x00\x00\x00\x00", r"not a text file \(control character '\\x00' on line 1\)"),
        ("seed: 0\n".encode("utf-16"), r"not a text file \(byte 0 is not UTF-8\)"),
        (b"", r"holds no keys \(empty, or only comments\); a recipe is a YAML mapping of keys"),
        (b"# anchor_modality: image\n\n", r"holds no keys \(empty, or only comments\)"),
        (b"- anchor_modality: image\n", r"a recipe is a YAML mapping of keys .* at top level, got list"),
        (b"just some words\n", r"a recipe is a YAML mapping of keys .* at top level, got str"),
        (b"seed: 1\n---\nseed: 2\n", r"not valid YAML: line 2, column 1: expected a single document"),
        (b"modalities: [image\nstages: 2\n", r"not valid YAML: line 2, column 7: while parsing a flow sequence"),
        (b"seed: !!python/object:os.system ls\n", "not valid YAML: line 1, column 7: could not determine a construc"),
        (b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 60)), "line 51: nested more than 50 levels deep"),
        (b"[" * 100_000, "line 1: nested more than 50 levels deep"),
        (b"seed: 0\n" + b"# padding\n" * 200_000, r"larger than 1024 KiB; a recipe is a short YAML text file"),
    ],
)
def test_a_file_that_is_no_recipe_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    code, stderr = validate(capsys, path)
    assert code == 2 and stderr.strip() == f"bindkit validate: error: {err.value}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("embed_dim=[1,", r"command line: override 'embed_dim': not valid YAML: line 1, column 4: while parsing"),
        ("embed_dim={a: 1", "command line: override 'embed_dim': not valid YAML"),
        ("embed_dim=\x07", r"command line: override 'embed_dim': not valid YAML: unacceptable character #x0007"),
        ("embed_dim=" + "[" * 60, "command line: override 'embed_dim': line 1: nested more than 50 levels deep"),
        ("embed_dim=-4", "embed_dim: expected a positive integer, got -4"),
        ("stages.٣.steps=2", "command line: override 'stages.٣.steps': stages has no item ٣"),
        ("embed_dim", "command line: override 'embed_dim' must look like key.sub=value"),
    ],
)
def test_overrides_with_bad_yaml_values_are_one_line_naming_the_recipe(tmp_path, override, message):
    path = write(tmp_path, minimal(tmp_path))
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path, [override])
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
