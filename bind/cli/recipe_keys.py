"""bindkit recipe-keys: every recipe key with its type, default and meaning, as Markdown.

The table is generated from the recipe dataclasses in bind/recipe/schema.py (the meaning is the comment on
each field's line), so it always matches what bindkit validate accepts. docs/recipe-keys.md is this
output; refresh it with: bindkit recipe-keys --out docs/recipe-keys.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipe-keys", help="print every recipe key with its type, default and meaning (Markdown)", description=__doc__
    )
    p.add_argument("--out", metavar="FILE", help="write the Markdown to FILE instead of printing it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..recipe.keys import recipe_reference
    from ..safe_io import write_atomic

    text = recipe_reference()
    if args.out:
        write_atomic(Path(args.out), text.encode())
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
