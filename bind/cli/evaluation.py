"""bindkit eval RUN_DIR: the binding matrix (every ordered pair of modalities) and zero-shot accuracy.

By default the run's own eval split. --data MANIFEST evaluates on your files instead: a CSV or JSONL
with one column per modality (paths relative to the manifest, or the text itself) and a label column;
its columns replace the eval data of those modalities, the others keep the run's. Labels are matched
to the run's classes by name, or by number ("7" is class 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..registry import load_plugins
from ._inputs import add_plugin_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on its eval split or your files", description=__doc__)
    p.add_argument("run_dir", help="a run directory written by bindkit run, e.g. runs/digits")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override keys of the run's recipe, e.g. eval.max_items=200",
    )
    p.add_argument("--data", metavar="MANIFEST", help="evaluate on a CSV/JSONL manifest of your own files")
    p.add_argument("--split", default="*", help="with --data: rows of this split column value (default: all rows)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-items", type=int, help="cap per modality (spread over the split)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_plugin_args(p)
    p.add_argument("--data-root", help="where the run's eval data is on this machine (default: the run's data_root)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import check_data_spec
    from ..data.manifest import read_manifest
    from ..evaluate import evaluate_all, format_results
    from ..recipe import parse_recipe, recipe_to_dict, set_override
    from ..runs import load_run
    from ._inputs import resolve_device

    load_plugins(args.plugin)
    device = resolve_device(args.device)
    model, recipe = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    data = recipe_to_dict(recipe)
    for item in args.overrides:
        set_override(data, item)
    if args.max_items is not None:
        if args.max_items < 1:
            raise ConfigError(f"--max-items: expected a positive number, got {args.max_items}")
        data["eval"]["max_items"] = args.max_items
    if args.data_root:
        data["data_root"] = args.data_root
    if args.data:
        manifest = Path(args.data).resolve()
        rows = read_manifest(manifest)
        columns = [c for c in (rows[0] if rows else {}) if c in model.modalities]
        if not columns:
            raise ConfigError(
                f"{args.data}: no column names a modality of the run ({', '.join(model.modalities)}); "
                f"its columns are {', '.join(rows[0]) if rows else 'none (empty file)'}"
            )
        for modality in columns:
            spec = {"source": "manifest", "split": args.split, "args": {"path": str(manifest), "column": modality}}
            data["modalities"][modality]["eval_data"] = spec
    recipe = parse_recipe(data, f"{args.run_dir}/recipe.yaml", check_data=False)
    for modality, spec in recipe.modalities.items():  # the run may come from another machine
        if spec.eval_data is not None:
            check_data_spec(spec.eval_data, recipe.data_root, f"{args.run_dir}: modalities.{modality}.eval_data")
    model.to(device)
    results = evaluate_all(model, recipe, device, show_progress=not args.no_progress)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0
