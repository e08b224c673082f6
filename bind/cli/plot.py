"""``bindkit plot RUN_DIR --out space.png|space.html``: picture of a run's embedding space, all modalities together.

:data:`DESCRIPTION` is the command's help text, in plain words for a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import ConfigError
from ._inputs import MANIFEST, add_plugin_args, check_file

# plain text, no reStructuredText markup: argparse prints it as it is
DESCRIPTION = """\
bindkit plot MODEL --out space.png|space.html: picture of a model's embedding space, all modalities together.

The eval split (or --data MANIFEST: your files) of every modality is embedded and projected jointly (PCA, or UMAP with the umap extra):
2-D for a .png (matplotlib), 3-D for an interactive .html (plotly). Colour is the class, with the class
names in the legend; marker shape is the modality. A spoken seven, a drawn seven and the word "seven"
should land on the same spoke. The .html file has plotly.js inside it, so it opens without a network.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's embedding space (.png or .html)", description=DESCRIPTION)
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument(
        "--out", required=True, help="space.png (2-D, matplotlib) or space.html (3-D, plotly, opens offline)"
    )
    p.add_argument(
        "--max-per-modality",
        type=int,
        default=300,
        metavar="N",
        help="eval items per modality, spread over the split so every class appears (default: 300)",
    )
    p.add_argument(
        "--method",
        choices=["pca", "umap"],
        default="pca",
        help="projection: pca (default) or umap (needs the umap extra)",
    )
    p.add_argument(
        "--data",
        metavar="MANIFEST",
        help="draw your files: a CSV/JSONL manifest, one column per modality and a label column (they replace the "
        "run's eval data of those modalities; a model without recipe.yaml needs it)",
    )
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # everything a user can get wrong is checked before the (slow) embedding pass, what needs no import first
    if args.max_per_modality < 1:
        raise ConfigError(f"--max-per-modality must be a positive number of items, got {args.max_per_modality}")
    if args.data:
        check_file(args.data, MANIFEST)

    from ..distributed import resolve_device
    from ..evaluate import embed_eval_splits
    from ..plot import output_dim, project, require_method, require_plot_library, save_figure, stack_splits
    from ..registry import load_plugins
    from ..runs import eval_recipe, load_run, read_manifest_columns

    dim = output_dim(args.out)
    require_plot_library(args.out)
    require_method(args.method)
    manifest = Path(args.data).resolve() if args.data else None
    columns = read_manifest_columns(manifest) if manifest else None
    load_plugins(args.plugin)
    model, recipe = load_run(args.run_dir, plugins=args.plugin, trust_plugins=args.trust_plugins)
    recipe = eval_recipe(model, recipe, str(args.run_dir), [], manifest, columns)
    recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, max_items=args.max_per_modality))
    device = resolve_device(recipe.device)
    splits = embed_eval_splits(model.to(device), recipe, device)
    space = stack_splits(splits)
    projection = project(space.embeddings, dim, args.method)
    counts = ", ".join(f"{len(items)} {m}" for m, (_, items) in splits.items())
    title = f"{Path(args.run_dir).resolve().name}: eval items ({counts}), joint {args.method.upper()} to {dim}-D"
    path = save_figure(space, projection, args.out, title)
    print(f"wrote {path} ({len(space.names)} points; {counts})")
    return 0
