"""bindkit index X.npy: build an approximate nearest-neighbour index of embeddings (from bindkit embed).

Writes X.index and X.index.json beside X.npy (or --out PATH and PATH.json); bindkit retrieve
--gallery-embeddings X.npy then searches with it (--backend exact to search exactly). The index kind is
chosen by size (Flat, IVF...,Flat, or IVF with 8-bit codes from 200k rows) unless
--factory names a FAISS index_factory string, and its search parameter is tuned to --recall (recall@10
against exact search on held-out rows). Needs faiss-cpu (pip install 'bindkit[faiss]'). An index file is
parsed by FAISS's C++ reader: load only indexes you built or trust.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ._inputs import check_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build an approximate search index of embeddings (FAISS)", description=__doc__)
    p.add_argument("embeddings", metavar="X.npy", help="embeddings written by bindkit embed")
    p.add_argument("--factory", default="auto", help="auto (by size), or a FAISS factory string, e.g. IVF1024,Flat")
    p.add_argument("--recall", type=float, default=0.95, help="target recall@10 the search is tuned to (default 0.95)")
    p.add_argument("--out", metavar="PATH", help="where to write the index (default: X.index beside X.npy)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.recall <= 1:
        raise ConfigError(f"--recall: expected a target between 0 and 1, got {args.recall}")
    if not args.factory.strip():
        raise ConfigError("--factory: expected auto or a FAISS factory string, got an empty one")
    check_file(args.embeddings, "embeddings, a .npy file (made by `bindkit embed`)")

    from ..ann import build_ann
    from ..retrieval import load_embeddings

    embeddings = load_embeddings(args.embeddings)  # memory-mapped; dtype, shape and NaN/inf checked
    ann, meta = build_ann(args.embeddings, embeddings, args.factory.strip(), args.recall, args.out)
    params = ", ".join(f"{name}={value}" for name, value in meta["params"].items()) or "none"
    rows, width = meta["embeddings"]["rows"], meta["embeddings"]["width"]
    print(f"{ann.path}: {meta['factory']} over {rows} x {width} embeddings")
    print(
        f"  search parameters  {params}" + (f"; top {meta['rescore']} x k re-scored exactly" if meta["rescore"] else "")
    )
    print(f"  recall@10          {meta['recall_at_10']:.3f} (target {meta['target_recall']}, held-out rows vs exact)")
    if meta["recall_at_10"] < meta["target_recall"]:
        print(
            f"  below the target: probing more cells would cost as much as exact search; these embeddings have "
            f"little neighbour structure for {meta['factory']} (search exactly: --backend exact)"
        )
    print(f"  build time         {meta['build_seconds']:.1f} s")
    print(f"  size               {meta['index_bytes']} bytes, {meta['bytes_per_vector']:.1f} per vector")
    return 0
