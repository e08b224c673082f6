"""bindkit eval MODEL: the binding matrix (every ordered pair of modalities) and zero-shot accuracy.

MODEL is a training run, a folder written by BindModel.save_pretrained, or a hub id (org/name).
By default a run's own eval split. --data MANIFEST evaluates on your files instead: a CSV or JSONL
with one column per modality (paths relative to the manifest, or the text itself) and a label column;
its columns replace the eval data of those modalities, and the others keep the run's (--data-only, or
a model without a recipe.yaml: only the manifest's columns are scored). Labels are matched to the
run's classes by name, or by number ("7" is class 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ._inputs import MANIFEST, add_plugin_args, check_device_name, check_file, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on its eval split or your files", description=__doc__)
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override keys of the run's recipe, e.g. eval.max_items=200",
    )
    p.add_argument("--data", metavar="MANIFEST", help="evaluate on a CSV/JSONL manifest of your own files")
    p.add_argument(
        "--data-only", action="store_true", help="with --data: score only the manifest's modalities, not the run's data"
    )
    p.add_argument("--split", default="*", help="with --data: rows of this split column value (default: all rows)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-items", type=int, help="cap per modality (spread over the split)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_plugin_args(p)
    p.add_argument("--data-root", help="where the run's eval data is on this machine (default: the run's data_root)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data_only and not args.data:
        raise ConfigError("--data-only goes with --data MANIFEST (the files to score)")
    if args.max_items is not None and args.max_items < 1:
        raise ConfigError(f"--max-items: expected a positive number, got {args.max_items}")
    check_device_name(args.device)
    if args.data:  # before anything heavy is imported; its rows are read and checked below, before the model
        check_file(args.data, MANIFEST)

    from ..evaluate import evaluate_all, format_results
    from ..registry import load_plugins
    from ..runs import eval_recipe, load_run, read_manifest_columns

    manifest = Path(args.data).resolve() if args.data else None
    columns = read_manifest_columns(manifest) if manifest else None  # the user's file is checked before the model
    load_plugins(args.plugin)
    device = resolve_device(args.device)
    model, recipe = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    overrides = [*args.overrides, *([f"eval.max_items={args.max_items}"] if args.max_items else [])]
    overrides += [f"data_root={args.data_root}"] if args.data_root else []
    recipe = eval_recipe(model, recipe, str(args.run_dir), overrides, manifest, columns, args.split, args.data_only)
    scored = [m for m, spec in recipe.modalities.items() if spec.eval_data is not None]
    if len(scored) < 2:
        raise ConfigError(
            f"{args.data or args.run_dir}: data of {len(scored)} modality ({', '.join(scored) or 'none'}) of the model's "
            f"{', '.join(model.modalities)}; evaluation scores pairs of modalities: add a column of another one"
        )
    model.to(device)
    results = evaluate_all(model, recipe, device, show_progress=not args.no_progress)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0
