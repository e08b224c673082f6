"""Recipes: every shipped recipe validates; each kind of mistake names the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bind import ConfigError, DataError, UnknownEncoderError
from bind.recipe import load_recipe, set_override

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_starts_with_its_command(path, data_root):
    recipe = load_recipe(path, [f"data_root={data_root}"])
    assert recipe.stages
    assert path.read_text().splitlines()[0].startswith(f"# bindkit run recipes/{path.name}")


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
