"""``bindkit validate RECIPE``: check a recipe (keys, types, encoder names, data paths) without training."""

from __future__ import annotations

import argparse

from ..registry import load_plugins
from ._inputs import add_plugin_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe without training", description=__doc__)
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (values are YAML)")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe

    load_plugins(args.plugin)
    recipe = load_recipe(args.recipe, args.overrides, trust_plugins=args.trust_plugins)
    stages = ", ".join(f"{s.name} ({s.kind})" for s in recipe.stages)
    print(
        f"{args.recipe}: ok; anchor {recipe.anchor_modality!r}, modalities {', '.join(recipe.modalities)}; stages {stages}"
    )
    return 0
