"""bindkit retrieve MODEL: the top K gallery items of one modality for queries of another.

MODEL is a training run, a folder written by BindModel.save_pretrained, or a hub id (org/name).

The gallery is embedded now (--gallery INPUT...) or was embedded before by bindkit embed
(--gallery-embeddings FILE.npy, whose names are read from FILE.names.txt beside it).
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ._inputs import (
    INPUTS_HELP,
    add_plugin_args,
    check_batch_size,
    check_device_name,
    check_file,
    check_input_files,
    check_modality,
    embed_inputs,
    read_inputs,
    resolve_device,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve", help="cross-modal search with a model (a run, a saved folder, a hub id)", description=__doc__
    )
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument("--query-modality", required=True, help="the modality of the queries, e.g. audio")
    p.add_argument("--query", nargs="+", required=True, metavar="INPUT", help="queries; " + INPUTS_HELP)
    p.add_argument("--gallery-modality", required=True, help="the modality of the gallery, e.g. text")
    gallery = p.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--gallery", nargs="+", metavar="INPUT", help="gallery inputs to embed now (as --query)")
    gallery.add_argument("--gallery-embeddings", metavar="FILE.npy", help="gallery embedded before (bindkit embed)")
    p.add_argument(
        "--gallery-names", metavar="FILE.txt", help="one name per gallery row (default: FILE.names.txt beside the .npy)"
    )
    p.add_argument("--top-k", type=int, default=5, help="results per query (default: 5)")
    p.add_argument(
        "--backend",
        choices=["auto", "exact", "faiss", "ann"],
        default="auto",
        help="auto (default): the approximate index FILE.index beside --gallery-embeddings when there is one "
        "(bindkit index), else exact; exact or faiss: exact search; ann: that index, required",
    )
    p.add_argument("--index", metavar="FILE.index", help="the approximate index (default: FILE.index beside the .npy)")
    p.add_argument("--batch-size", type=int, default=64, help="items embedded at once (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {query, results: [{item, score}]}")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # what needs no model first, in a fraction of a second: options, @LIST files, a gallery embedded before
    check_batch_size(args.batch_size)
    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected a positive number of results, got {args.top_k}")
    check_device_name(args.device)
    check_input_files([*args.query, *(args.gallery or [])])
    if args.gallery_embeddings:
        check_file(args.gallery_embeddings, GALLERY)
    if args.gallery_names:
        check_file(args.gallery_names, GALLERY_NAMES)
    if args.gallery and (args.backend == "ann" or args.index):
        raise ConfigError("--backend ann and --index search a gallery embedded before: use --gallery-embeddings")
    if args.index:
        check_file(args.index, "an approximate index (made by `bindkit index`)")

    from ..registry import load_plugins
    from ..retrieval import SearchIndex, open_gallery
    from ..runs import load_run

    device = resolve_device(args.device)
    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    model.to(device)
    check_modality(model, args.gallery_modality)
    queries = read_inputs(model, args.query_modality, args.query)
    if args.gallery:
        names = read_inputs(model, args.gallery_modality, args.gallery)
        gallery = embed_inputs(model, args.gallery_modality, names, args.batch_size)
        index = SearchIndex(gallery, names, backend="faiss" if args.backend == "faiss" else "exact")
    else:  # memory-mapped, no pickle; dtype, shape, NaN/inf, the names' count and the index checked: one-line errors
        index = open_gallery(
            args.gallery_embeddings, args.gallery_names, model.embed_dim, backend=args.backend, index=args.index
        )
    results = index.search(embed_inputs(model, args.query_modality, queries, args.batch_size), k=args.top_k)
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


GALLERY = "gallery embeddings, a .npy file (made by `bindkit embed`)"
GALLERY_NAMES = "gallery names, one per line"
