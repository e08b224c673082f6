"""``bindkit run RECIPE [key.sub=value ...]``: train a recipe's stages, save the model, evaluate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..registry import load_plugins


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train a recipe", description=__doc__)
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (values are YAML)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE_NAME)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE to register encoders")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import format_results
    from ..recipe import load_recipe
    from ..trainer import run_recipe

    load_plugins(args.plugin)
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    results = run_recipe(recipe, out, show_progress=not args.no_progress)
    print(format_results(results, recipe.eval.prompt_modality))
    print(f"run directory: {out}  (model.safetensors, config.json, metrics.jsonl, eval.json)")
    return 0
