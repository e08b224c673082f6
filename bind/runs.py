"""A finished run directory: the model and the resolved recipe that made it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import DataError
from .model import BindModel
from .recipe import Recipe, parse_recipe


def load_run(
    run_dir: str | os.PathLike[str], plugins: list[str] | tuple[str, ...] = (), map_location: str = "cpu"
) -> tuple[BindModel, Recipe]:
    """``(model, recipe)`` of a run written by ``bindkit run``; the model in eval mode."""
    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise DataError(f"{recipe_path} is missing: {run_dir} is not a bindkit run directory (made by `bindkit run`)")
    data = yaml.safe_load(recipe_path.read_text())
    data["plugins"] = sorted({*data.get("plugins", []), *plugins})
    recipe = parse_recipe(data, str(recipe_path))
    model = BindModel.from_pretrained(run_dir, plugins=recipe.plugins, map_location=map_location).eval()
    return model, recipe
