"""The recipe key reference (docs/recipe-keys.md) is generated from bind/recipe/schema.py and cannot go stale."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from bind.recipe import Recipe
from bind.recipe import keys as reference
from bind.recipe import schema as recipe_module
from bind.recipe.keys import documented_fields, field_docs, recipe_reference

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "recipe-keys.md"
PLACEHOLDERS = {  # mapping keys a user names, by the path of the mapping
    "modalities": "<name>",
    "stages[i].pairs": "<modality>",
    "eval.sets": "<set>",
    "eval.sets.<set>": "<modality>",
}


@pytest.fixture(scope="module")
def text() -> str:
    return recipe_reference()


@pytest.fixture(scope="module")
def sections(text) -> dict[str, dict[str, list[str]]]:
    """Section heading -> key -> [type, default, meaning], parsed back from the Markdown."""
    out: dict[str, dict[str, list[str]]] = {}
    for chunk in text.split("\n## ")[1:]:
        heading, *lines = chunk.splitlines()
        rows = [line.strip("|").split(" | ") for line in lines if line.startswith("| `")]
        out[heading] = {row[0].strip(" `"): [cell.strip() for cell in row[1:]] for row in rows}
    return out


def section_for(sections: dict[str, dict[str, list[str]]], path: str) -> dict[str, list[str]]:
    heading = f"`{path}`" if path else "Top level"
    found = [rows for title, rows in sections.items() if heading in title.split(" / ")]
    assert len(found) == 1, f"no section {heading} in the reference (sections: {list(sections)})"
    return found[0]


def test_docs_file_is_the_generated_reference(text):
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/recipe-keys.md is stale: run `bindkit recipe-keys --out docs/recipe-keys.md`"
    )
    assert text.splitlines()[0].startswith("<!--") and "bindkit recipe-keys --out docs/recipe-keys.md" in text


def test_every_field_of_every_recipe_dataclass_has_a_row_with_a_meaning(sections):
    classes = [c for _, c in inspect.getmembers(recipe_module, inspect.isclass) if dataclasses.is_dataclass(c)]
    classes = [c for c in classes if c.__module__ == recipe_module.__name__]
    assert {c.__name__ for c in classes} >= {"Recipe", "ModalitySpec", "DataSpec", "StageSpec", "PairSpec"}
    by_class = dict(reference.SECTIONS)
    for cls in classes:
        assert cls in by_class, f"{cls.__name__} has no section in bind/recipe/keys.py SECTIONS"
        paths = by_class[cls] or ("",)
        for path in paths:
            rows = section_for(sections, path)
            names = [f.name for f in dataclasses.fields(cls) if (cls, f.name) != (Recipe, "source")]
            assert list(rows) == names, f"section {path or 'top level'}: keys differ from {cls.__name__}'s fields"
            for name, (type_text, default, meaning) in rows.items():
                assert type_text and default and meaning, f"{path}.{name}: empty cell"
    assert "source" not in section_for(sections, ""), "Recipe.source is internal, not a recipe key"


def test_reference_types_and_defaults_read_plainly(sections):
    top, modality = section_for(sections, ""), section_for(sections, "modalities.<name>")
    stage = section_for(sections, "stages[i]")
    assert top["anchor_modality"][1] == "required"
    assert top["plugins"][:2] == ["list of str", "`[]`"]
    assert top["checkpoint_every"][:2] == ["int or null", "`200`"]
    assert modality["freeze"][0] == "'none' or 'trunk' or 'all'"
    assert modality["args"][:2] == ["mapping", "`{}`"]
    assert stage["optimizer"][1] == "see `stages[i].optimizer`"
    assert top["eval"][1] == "see `eval`"


def _walk(value: Any, tp: Any, path: str, used: list[tuple[str, str]]) -> None:
    """Record (section path, key) for every key of the YAML that a recipe dataclass reads."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        for key, sub in value.items():
            used.append((path, key))
            assert key in hints, f"{path}.{key}: not a field of {tp.__name__}"
            _walk(sub, hints[key], f"{path}.{key}" if path else key, used)
    elif origin is dict:  # dict[str, Any] (args, augment) is free-form: its keys are not recipe keys
        for sub in value.values() if args[1] is not Any else ():
            _walk(sub, args[1], f"{path}.{PLACEHOLDERS[path]}", used)
    elif origin is list:
        for sub in value:
            _walk(sub, args[0], f"{path}[i]", used)
    elif isinstance(value, dict) and any(dataclasses.is_dataclass(a) for a in args):  # Spec | None
        _walk(value, next(a for a in args if dataclasses.is_dataclass(a)), path, used)


def test_every_key_of_the_digits_recipe_is_documented(sections):
    used: list[tuple[str, str]] = []
    _walk(yaml.safe_load((ROOT / "recipes" / "digits.yaml").read_text()), Recipe, "", used)
    assert len(used) > 40 and ("stages[i].pairs.<modality>", "batch_size") in used
    for path, key in used:
        rows = section_for(sections, path)
        assert key in rows and rows[key][2], f"recipes/digits.yaml key {path}.{key} is not in the reference"


@dataclass
class _Undocumented:
    documented: int = 1  # has a meaning
    silent: str = "x"
    wrapped: tuple[int, int] = (
        1,
        2,  # a meaning on a later line of the field still counts
    )
    items: list[str] = field(default_factory=list)  # also has one


def test_a_field_without_a_comment_makes_the_generator_raise(monkeypatch):
    assert field_docs(_Undocumented) == {
        "documented": "has a meaning",
        "silent": "",
        "wrapped": "a meaning on a later line of the field still counts",
        "items": "also has one",
    }
    with pytest.raises(ValueError, match=r"_Undocumented\.silent has no meaning"):
        documented_fields(_Undocumented)
    real = reference.field_docs
    monkeypatch.setattr(reference, "field_docs", lambda cls: {**real(cls), "seed": ""} if cls is Recipe else real(cls))
    with pytest.raises(ValueError, match=r"Recipe\.seed has no meaning"):
        recipe_reference()


def test_a_nested_dataclass_without_a_section_makes_the_generator_raise(monkeypatch):
    monkeypatch.setattr(reference, "SECTIONS", [s for s in reference.SECTIONS if s[0].__name__ != "LoraSpec"])
    reference._section_paths.cache_clear()
    try:
        with pytest.raises(ValueError, match="missing LoraSpec"):
            recipe_reference()
    finally:
        monkeypatch.undo()
        reference._section_paths.cache_clear()


def test_cli_prints_and_writes_the_reference(tmp_path, capsys, text):
    from bind.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["recipe-keys"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == text
    out = tmp_path / "keys.md"
    with pytest.raises(SystemExit):
        main(["recipe-keys", "--out", str(out)])
    assert out.read_text() == text
