"""``bindkit data fetch NAME``: download a data set the recipes use, verified, into the data root.

The data root is ``--root``, else $BINDKIT_DATA, else ../shared/data when it exists, else the platform cache
folder (~/.cache/bindkit/data on Linux). Data already there that verifies is left as it is (no download).
$BINDKIT_DATA_MIRROR=URL downloads the same file names from another place. ``bindkit data list`` shows the sets
and whether each is in the data root; ``bindkit data path`` prints the root. ``bindkit run`` fetches a recipe's missing data on its first run. Example::

    bindkit data fetch digits
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download the data sets recipes use, verified", description=__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="fetch NAME, path, or list")
    fetch = actions.add_parser("fetch", help="download a set into the data root unless it is there, verified")
    fetch.add_argument("name", help="the set, e.g. digits (bindkit data list shows them)")
    fetch.add_argument("--root", metavar="DIR", help="data root (default: $BINDKIT_DATA, ../shared/data, the cache)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    path = actions.add_parser("path", help='print the data root (in scripts: "$(bindkit data path)/fsdd/...")')
    path.add_argument("--root", metavar="DIR", help="data root (default: $BINDKIT_DATA, ../shared/data, the cache)")
    listing = actions.add_parser("list", help="the sets bindkit can download and whether each is in the data root")
    listing.add_argument("--root", metavar="DIR", help="data root (default: $BINDKIT_DATA, ../shared/data, the cache)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.fetch import FETCHABLE, data_status, fetch_data

    if args.action == "path":
        from ..data import resolve_data_root

        print(resolve_data_root(args.root).resolve())
        return 0
    if args.action == "list":
        status = data_status(args.root)
        print(f"data root: {status['root']} ({status['root_from']})")
        for name, state in status["sets"].items():
            print(f"  {name}  {state}  {FETCHABLE[name].summary}")
        return 0
    result = fetch_data(args.name, args.root, progress=not args.no_progress, say=print)
    done = "downloaded and verified" if result.downloaded else "already there and verified; nothing downloaded"
    print(f"{result.root}: {args.name} data {done}")
    return 0


def read_recipe_args(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`bind.recipe.read_recipe` of ``args.recipe`` with ``args.overrides``: before anything heavy loads."""
    from ..recipe import read_recipe

    return read_recipe(args.recipe, args.overrides)


def load_recipe_fetching_data(args: argparse.Namespace, data: dict[str, Any] | None = None) -> Any:
    """``bindkit run``'s recipe (``data``: the mapping :func:`read_recipe_args` read, else read now), checked; on a
    first run, the data its builders can download (``builder.fetch``) is fetched first, since the check would refuse
    the recipe for the very data it is about to get.

    ``bindkit validate`` loads without this: it never downloads, its error names the command that does."""
    import copy

    from ..errors import DataError
    from ..recipe import parse_recipe

    data = read_recipe_args(args) if data is None else data
    source = str(Path(args.recipe))
    try:
        return parse_recipe(copy.deepcopy(data), source, trust_plugins=args.trust_plugins)
    except DataError:
        if not _fetch_for_recipe(args, data):
            raise  # data bindkit cannot download: the check's own message says what to put where
    return parse_recipe(copy.deepcopy(data), source, trust_plugins=args.trust_plugins)


def _fetch_for_recipe(args: argparse.Namespace, data: dict[str, Any]) -> list[Any]:
    """Fetch the missing sets the recipe's data specs read; [] when none of them can be downloaded."""
    import copy

    from ..data.fetch import fetch_missing
    from ..recipe import parse_recipe

    recipe = parse_recipe(copy.deepcopy(data), str(args.recipe), check_data=False, trust_plugins=args.trust_plugins)
    specs = [s for m in recipe.modalities.values() for s in (m.train_data, m.eval_data) if s is not None]
    specs += [s for data_set in recipe.eval.sets.values() for s in data_set.values()]
    return fetch_missing(specs, recipe.data_root, progress=not getattr(args, "no_progress", False), say=print)
