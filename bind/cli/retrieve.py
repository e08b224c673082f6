"""``bindkit retrieve RUN_DIR``: the top K gallery items of one modality for queries of another."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import load_plugins
from ._inputs import embed_inputs, read_inputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="cross-modal search with a trained run", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--query-modality", required=True)
    p.add_argument("--query", nargs="+", required=True, metavar="INPUT")
    p.add_argument("--gallery-modality", required=True)
    gallery = p.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--gallery", nargs="+", metavar="INPUT", help="gallery inputs to embed now")
    gallery.add_argument("--gallery-embeddings", metavar="FILE.npy", help="gallery embedded before (bindkit embed)")
    p.add_argument("--gallery-names", metavar="FILE.txt", help="one name per gallery row (with --gallery-embeddings)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", choices=["exact", "faiss"], default="exact")
    p.add_argument("--json", action="store_true", help="print a JSON list of {query, results: [{item, score}]}")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..retrieval import SearchIndex
    from ..runs import load_run

    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin)
    if args.gallery:
        names = read_inputs(args.gallery_modality, args.gallery)
        gallery = embed_inputs(model, args.gallery_modality, names)
    else:
        gallery, names = _load_gallery(args.gallery_embeddings, args.gallery_names, model.embed_dim)
    queries = read_inputs(args.query_modality, args.query)
    index = SearchIndex(gallery, names, backend=args.backend)
    results = index.search(embed_inputs(model, args.query_modality, queries), k=args.top_k)
    if args.json:
        rows = [
            {"query": q, "results": [{"item": n, "score": round(s, 6)} for n, s in hits]}
            for q, hits in zip(queries, results, strict=True)
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for query, hits in zip(queries, results, strict=True):
        print(f"{args.query_modality}: {query}")
        for rank, (name, score) in enumerate(hits, 1):
            print(f"  {rank:>2}. {score:+.3f}  {name}")
    return 0


def _load_gallery(path: str, names_path: str | None, embed_dim: int) -> tuple[np.ndarray, list[str]]:
    if not Path(path).is_file():
        raise DataError(f"{path}: gallery embeddings not found (make them with `bindkit embed`)")
    gallery = np.load(path, mmap_mode="r")
    if gallery.ndim != 2 or gallery.shape[1] != embed_dim:
        raise ConfigError(f"{path}: expected (N, {embed_dim}) embeddings from this run, got shape {gallery.shape}")
    if names_path is None:
        return gallery, [str(i) for i in range(len(gallery))]
    if not Path(names_path).is_file():
        raise DataError(f"{names_path}: gallery names file not found")
    names = Path(names_path).read_text().splitlines()
    if len(names) != len(gallery):
        raise ConfigError(f"{names_path}: {len(names)} names for {len(gallery)} gallery rows in {path}")
    return gallery, names
