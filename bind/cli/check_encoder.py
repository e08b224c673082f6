"""bindkit check-encoder: run the encoder contract checks on registered encoders, yours included.

Builds each encoder's tiny variant (the tiny= arguments of @register_encoder) and checks, on the
raw items its example_inputs method returns: that preprocess and collate accept them, that embed
gives unit-norm rows independent of batching, that training reaches every trainable parameter,
that freeze("all") and freeze("trunk") freeze what they say, and that a saved model reloads with
identical outputs. Prints one line per check (ok, or FAIL and what failed); exits 1 if any fails.

Example: bindkit check-encoder my_encoder --plugin my_encoders
The same from pytest: bind.testing.check_encoder("my_encoder", tmp_path, strict=True)
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
from pathlib import Path

# bind.testing.CONTRACT_CHECKS, in the order they run, written out so that the parser imports no torch
# (tests/test_startup.py checks that the two are the same)
CHECKS = ("example_inputs", "embed", "backward", "freeze_all", "freeze_trunk", "save_load")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-encoder", help="run the encoder contract checks on registered encoders", description=__doc__
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="registered encoder name(s) to check")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (or a .py file) to register encoders",
    )
    p.add_argument(
        "--check",
        action="append",
        choices=CHECKS,
        dest="checks",
        metavar="CHECK",
        help=f"run only this check (repeatable; default: all of {', '.join(CHECKS)})",
    )
    p.add_argument(
        "--scratch",
        type=Path,
        metavar="DIR",
        help="keep the tiny variants' files and the saved models in DIR (default: a temporary folder, removed)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..registry import get_encoder_info, load_plugins

    load_plugins(args.plugin)
    for name in args.names:  # every name known before any check runs: an unknown one is one line, exit 2
        get_encoder_info(name)
    if args.scratch is not None:
        return _check_all(args, args.scratch)
    with tempfile.TemporaryDirectory(prefix="bindkit-check-") as scratch:
        return _check_all(args, Path(scratch))


def _check_all(args: argparse.Namespace, scratch: Path) -> int:
    from ..testing import check_encoder

    failed = 0
    for name in args.names:
        for result in check_encoder(name, scratch / name, checks=args.checks):
            print(str(result), flush=True)
            if not result.ok:
                failed += 1
                if args.debug and result.error is not None:
                    traceback.print_exception(result.error)
    return 1 if failed else 0
