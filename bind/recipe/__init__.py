"""Recipes: YAML files validated into typed dataclasses before anything trains.

A recipe names the modalities (encoder + arguments + what is frozen), the data, and the stages.
:func:`load_recipe` checks every key against the dataclasses of :mod:`bind.recipe.schema`
(:mod:`bind.typed_yaml` reads the YAML and converts it), then the rules across keys in
:mod:`bind.recipe.checks`: encoder names and arguments, losses and augmenters against their registries,
data paths, what each stage freezes (:mod:`bind.recipe.freeze`). Each error names the file, the key, what
was expected and what was found. The dataclasses never see the YAML: the trainer turns them into plain
arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..typed_yaml import build, read_recipe_file, require_mapping, set_override
from .freeze import Freeze, stage_modalities, tower_freeze
from .schema import (
    RANGES,
    RUN_ONLY_KEYS,
    DataSpec,
    EvalSpec,
    LoraSpec,
    ModalitySpec,
    OptimSpec,
    PairSpec,
    Recipe,
    StageSpec,
    changed_keys,
    recipe_to_dict,
)

__all__ = [
    "RANGES",
    "RUN_ONLY_KEYS",
    "DataSpec",
    "EvalSpec",
    "Freeze",
    "LoraSpec",
    "ModalitySpec",
    "OptimSpec",
    "PairSpec",
    "Recipe",
    "StageSpec",
    "changed_keys",
    "load_recipe",
    "parse_recipe",
    "read_recipe",
    "read_recipe_file",
    "recipe_to_dict",
    "set_override",
    "stage_modalities",
    "tower_freeze",
]


def parse_recipe(data: Any, source: str = "<recipe>", check_data: bool = True, trust_plugins: bool = False) -> Recipe:
    """Validate a recipe mapping; ``check_data=False`` skips the data paths (a run used on another machine).

    The recipe's ``plugins`` are imported only with ``trust_plugins`` or when already loaded
    (:func:`bind.registry.load_named_plugins`): a recipe may come from anyone."""
    recipe = build(Recipe, require_mapping(data, source), f"{source}: ", RANGES, hidden=frozenset({"source"}))
    recipe.source = source
    from .checks import check_recipe  # the registries, and torch: only once the keys and types are right

    check_recipe(recipe, check_data, trust_plugins)
    return recipe


def read_recipe(path: str | os.PathLike[str], overrides: list[str] = ()) -> dict[str, Any]:
    """A recipe file's mapping with ``key.sub=value`` overrides applied, not yet checked: no torch, no encoder
    (the command line reads it first, so a missing file, bad YAML or a bad override is one line at once)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    data = read_recipe_file(path)
    for item in overrides:
        set_override(data, item, f"{path}: command line")
    return data


def load_recipe(path: str | os.PathLike[str], overrides: list[str] = (), trust_plugins: bool = False) -> Recipe:
    """Read, override and validate a recipe file (``trust_plugins``: import the modules its ``plugins`` name)."""
    return parse_recipe(read_recipe(path, overrides), str(Path(path)), trust_plugins=trust_plugins)
