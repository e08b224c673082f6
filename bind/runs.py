"""A model to use: a training run, a folder written by ``save_pretrained``, or a hub id; with its recipe if any.

Every command that takes a model (``embed``, ``retrieve``, ``eval``, ``plot``) reads it through
:func:`load_run`. A training run is one kind of model folder: it also holds the resolved ``recipe.yaml``
(its eval data, its classes), which ``eval`` and ``plot`` use when no ``--data`` is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, DataError
from .hub import resolve_model
from .model import BindModel
from .model_files import CONFIG_NAME, WEIGHTS_NAME
from .recipe import RANGES, Recipe, parse_recipe, read_recipe_file, recipe_to_dict, set_override
from .registry import load_named_plugins, load_plugins
from .typed_yaml import build

RECIPE_NAME = "recipe.yaml"


def load_run(
    run_dir: str | os.PathLike[str],
    plugins: list[str] | tuple[str, ...] = (),
    map_location: str = "cpu",
    trust_plugins: bool = False,
) -> tuple[BindModel, Recipe | None]:
    """``(model, recipe)`` of a model folder or hub id; the model in eval mode, ``recipe`` None when the folder
    has no ``recipe.yaml`` (a model assembled and saved without training, or published without it).

    ``plugins``: modules to import first (the caller names them). The plugins a run's recipe names
    are imported only with ``trust_plugins`` (a model folder may come from anyone) or when already
    loaded; otherwise :class:`bind.errors.UntrustedPluginError` says what would run.
    """
    source = resolve_model(run_dir)
    directory = source.directory
    recipe_path = directory / RECIPE_NAME
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            what = "the run in" if recipe_path.is_file() else "the model folder"
            raise DataError(
                f"{directory / name} is missing: {what} {run_dir} is incomplete (`bindkit run` writes {CONFIG_NAME} "
                f"and {WEIGHTS_NAME} when training ends, BindModel.save_pretrained when called); let the run finish "
                "(or resume it), or pass a finished run or a saved model"
            )
    load_plugins(list(plugins))
    data = None
    if recipe_path.is_file():
        try:  # read as any file from anyone: bounded, text only, no YAML anchors or aliases
            data = read_recipe_file(recipe_path)
        except ConfigError as err:
            raise ConfigError(f"{err}; `bindkit run` writes it: restore it from the recipe the run used") from None
        if not isinstance(data.get("plugins", []), list):
            raise ConfigError(f"{recipe_path}: plugins: expected a list of module names, got {data['plugins']!r}")
        named = [str(m) for m in data.get("plugins", [])]
        load_named_plugins(named, f"{recipe_path}: plugins", trust_plugins)
        data["plugins"] = sorted({*named, *plugins})
    # the model first: its config.json knows which module registers each encoder, the recipe does not
    model = BindModel.from_pretrained(directory, map_location=map_location).eval()
    if data is None:
        return model, None
    # the data need not be here: embedding and retrieval work on any machine; `bindkit eval` reads it later
    return model, parse_recipe(data, str(recipe_path), check_data=False, trust_plugins=True)  # loaded above


def model_recipe(model: BindModel, source: str) -> Recipe:
    """A recipe describing ``model`` as it is (its encoders, no stages, no data): what ``eval --data`` and
    ``plot --data`` fill in for a model folder that has no ``recipe.yaml``. Nothing is built from it."""
    modalities = {m: {"encoder": spec["name"]} for m, spec in model.config()["encoders"].items()}
    return recipe_as_given(
        {"anchor_modality": model.anchor_modality, "embed_dim": model.embed_dim, "modalities": modalities},
        source,
    )


def recipe_as_given(data: dict, source: str) -> Recipe:
    """A :class:`Recipe` from plain data, types and ranges checked, without the cross-key checks of a recipe to
    train (encoder arguments, stages): for describing a model that exists already."""
    recipe = build(Recipe, {"stages": [], **data}, f"{source}: ", RANGES, hidden=frozenset({"source"}))
    recipe.source = source
    return recipe


def read_manifest_columns(manifest: Path) -> list[str]:
    """The columns of a manifest of the user's files (read and checked in full: a bad file fails before a model
    loads)."""
    from .data.manifest import read_manifest

    rows = read_manifest(manifest)
    return list(rows[0]) if rows else []


def eval_recipe(
    model: BindModel,
    recipe: Recipe | None,
    source: str,
    overrides: list[str] = (),
    manifest: Path | None = None,
    columns: list[str] | None = None,
    split: str = "*",
    data_only: bool = False,
) -> Recipe:
    """The recipe that evaluates ``model``: a run's own (``recipe``), with ``key=value`` ``overrides``, and with
    ``manifest``'s columns replacing the eval data of those modalities. The other modalities keep the run's
    eval data, unless ``data_only`` or the model has no recipe (then only the manifest's are scored); the run's
    extra eval sets are dropped, as they are not the user's files. Data paths are checked here."""
    from .data import check_data_spec

    if recipe is None and manifest is None:
        raise ConfigError(
            f"{source}: a model folder without recipe.yaml has no eval data of its own; "
            "pass --data MANIFEST (a CSV or JSONL of your files with a label column)"
        )
    data = recipe_to_dict(recipe if recipe is not None else model_recipe(model, source))
    for item in overrides:
        set_override(data, item)
    if manifest is not None:
        used = [c for c in columns or [] if c in model.modalities]
        if not used:
            raise ConfigError(
                f"{manifest}: no column names a modality of the model ({', '.join(model.modalities)}); "
                f"its columns are {', '.join(columns) if columns else 'none (empty file)'}"
            )
        data["eval"]["sets"] = {}
        for modality, spec in data["modalities"].items():
            if modality in used:
                args = {"path": str(manifest), "column": modality}
                spec["eval_data"] = {"source": "manifest", "split": split, "args": args}
            elif data_only or recipe is None:
                spec["eval_data"] = None
    if recipe is not None:  # its plugins were loaded with the run
        out = parse_recipe(data, f"{source}/{RECIPE_NAME}", check_data=False, trust_plugins=True)
    else:
        out = recipe_as_given(data, source)
    for modality, spec in out.modalities.items():  # the run may come from another machine
        if spec.eval_data is not None:
            check_data_spec(spec.eval_data, out.data_root, f"{source}: modalities.{modality}.eval_data")
    return out
