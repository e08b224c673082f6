"""``bindkit losses``: the registered losses a recipe's ``loss:`` may name, by stage kind."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="list registered losses", description=__doc__)
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE to register losses")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..losses import get_loss, list_losses
    from ..registry import load_plugins

    load_plugins(args.plugin)
    rows = [
        {"name": name, "kind": info.kind, "module": info.fn.__module__, "description": info.description}
        for name in list_losses()
        for info in [get_loss(name)]
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME'.ljust(width)}  KIND      DESCRIPTION")
    for r in rows:
        print(f"{r['name'].ljust(width)}  {r['kind'].ljust(8)}  {r['description']}")
    return 0
