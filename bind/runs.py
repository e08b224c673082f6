"""A finished run directory: the model and the resolved recipe that made it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import ConfigError, DataError
from .model import CONFIG_NAME, WEIGHTS_NAME, BindModel
from .recipe import Recipe, parse_recipe


def load_run(
    run_dir: str | os.PathLike[str], plugins: list[str] | tuple[str, ...] = (), map_location: str = "cpu"
) -> tuple[BindModel, Recipe]:
    """``(model, recipe)`` of a run written by ``bindkit run``; the model in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such directory; expected a run directory written by `bindkit run`")
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise DataError(f"{recipe_path} is missing: {run_dir} is not a bindkit run directory (made by `bindkit run`)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (run_dir / name).is_file():
            raise DataError(
                f"{run_dir / name} is missing: the run in {run_dir} is incomplete (`bindkit run` writes {CONFIG_NAME} "
                f"and {WEIGHTS_NAME} when training ends); let it finish (or resume it), or pass a finished run"
            )
    try:
        data = yaml.safe_load(recipe_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"{recipe_path}: not valid YAML{at}; `bindkit run` writes it: restore it from the recipe the run used"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{recipe_path}: expected a recipe (a YAML mapping), got {type(data).__name__}")
    if not isinstance(data.get("plugins", []), list):
        raise ConfigError(f"{recipe_path}: plugins: expected a list of module names, got {data['plugins']!r}")
    data["plugins"] = sorted({*data.get("plugins", []), *plugins})
    # the model first: its config.json knows which module registers each encoder, the recipe does not
    model = BindModel.from_pretrained(run_dir, plugins=data["plugins"], map_location=map_location).eval()
    # the data need not be here: embedding and retrieval work on any machine; `bindkit eval` reads it later
    return model, parse_recipe(data, str(recipe_path), check_data=False)
