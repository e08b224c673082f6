"""A finished run directory: the model and the resolved recipe that made it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, DataError
from .model import BindModel
from .model_files import CONFIG_NAME, WEIGHTS_NAME
from .recipe import Recipe, parse_recipe, read_recipe_file
from .registry import load_named_plugins, load_plugins


def load_run(
    run_dir: str | os.PathLike[str],
    plugins: list[str] | tuple[str, ...] = (),
    map_location: str = "cpu",
    trust_plugins: bool = False,
) -> tuple[BindModel, Recipe]:
    """``(model, recipe)`` of a run written by ``bindkit run``; the model in eval mode.

    ``plugins``: modules to import first (the caller names them). The plugins the run's recipe names
    are imported only with ``trust_plugins`` (a run directory may come from anyone) or when already
    loaded; otherwise :class:`bind.errors.UntrustedPluginError` says what would run.
    """
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
    try:  # read as any file from anyone: bounded, text only, no YAML anchors or aliases
        data = read_recipe_file(recipe_path)
    except ConfigError as err:
        raise ConfigError(f"{err}; `bindkit run` writes it: restore it from the recipe the run used") from None
    if not isinstance(data.get("plugins", []), list):
        raise ConfigError(f"{recipe_path}: plugins: expected a list of module names, got {data['plugins']!r}")
    load_plugins(list(plugins))
    named = [str(m) for m in data.get("plugins", [])]
    load_named_plugins(named, f"{recipe_path}: plugins", trust_plugins)
    data["plugins"] = sorted({*named, *plugins})
    # the model first: its config.json knows which module registers each encoder, the recipe does not
    model = BindModel.from_pretrained(run_dir, map_location=map_location).eval()
    # the data need not be here: embedding and retrieval work on any machine; `bindkit eval` reads it later
    return model, parse_recipe(data, str(recipe_path), check_data=False, trust_plugins=True)  # loaded above
