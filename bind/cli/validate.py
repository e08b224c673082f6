"""``bindkit validate RECIPE``: check a recipe (keys, types, encoder names, data paths) without training."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._inputs import add_plugin_args
from .data import read_recipe_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe without training", description=__doc__)
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (values are YAML)")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = read_recipe_args(args)  # the file, its YAML and the overrides: before torch and the encoders load

    from ..recipe import parse_recipe
    from ..registry import load_plugins

    load_plugins(args.plugin)
    recipe = parse_recipe(data, str(Path(args.recipe)), trust_plugins=args.trust_plugins)  # as load_recipe names it
    stages = ", ".join(f"{s.name} ({s.kind})" for s in recipe.stages)
    print(
        f"{args.recipe}: ok; anchor {recipe.anchor_modality!r}, modalities {', '.join(recipe.modalities)}; stages {stages}"
    )
    return 0
