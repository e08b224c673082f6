"""``bindkit eval RUN_DIR``: the binding matrix (every ordered pair of modalities) and zero-shot accuracy."""

from __future__ import annotations

import argparse
import json

from ..registry import load_plugins


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on its eval split", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-items", type=int, help="cap per modality (spread over the split)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.add_argument("--data-root", help="where the eval data is on this machine (default: the run's data_root)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import check_data_spec
    from ..evaluate import evaluate_model, format_results
    from ..runs import load_run

    load_plugins(args.plugin)
    model, recipe = load_run(args.run_dir, args.plugin)
    if args.max_items is not None:
        recipe.eval.max_items = args.max_items
    if args.data_root:
        recipe.data_root = args.data_root
    for modality, spec in recipe.modalities.items():  # the run may come from another machine
        if spec.eval_data is not None:
            check_data_spec(spec.eval_data, recipe.data_root, f"{args.run_dir}: modalities.{modality}.eval_data")
    results = evaluate_model(model, recipe, torch.device("cpu"))
    print(json.dumps(results, indent=2) if args.json else format_results(results, recipe.eval.prompt_modality))
    return 0
