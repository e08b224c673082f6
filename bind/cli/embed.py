"""``bindkit embed RUN_DIR --modality M --out FILE.npy INPUT...``: embed files or texts with a trained run."""

from __future__ import annotations

import argparse

import numpy as np

from ..registry import load_plugins
from ._inputs import embed_inputs, read_inputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed inputs with a trained run", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="file paths; for text the strings (@file.txt: one per line)"
    )
    p.add_argument("--modality", required=True)
    p.add_argument("--out", required=True, help="output .npy: float32 (N, D), unit-norm rows, input order")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runs import load_run

    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin)
    items = read_inputs(args.modality, args.inputs)
    embeddings = embed_inputs(model, args.modality, items, args.batch_size)
    np.save(args.out, embeddings)
    print(f"{args.out}: {embeddings.shape[0]} x {embeddings.shape[1]} float32 ({args.modality})")
    return 0
