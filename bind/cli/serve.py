"""bindkit serve: (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="(being written)", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return 0
