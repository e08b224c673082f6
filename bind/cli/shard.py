"""``bindkit shard MANIFEST --out DIR``: pack a manifest's rows into WebDataset tar shards.

One sample per row (key: the row number, or the ``id`` column), one tar member per modality
column, plus ``DIR/index.json`` (shards, counts, columns, class names). Read them back with
``source: shards`` in a recipe or :class:`bind.data.shards.ShardPairs`. Example::

    bindkit shard pairs.csv --out shards/train --split train --samples-per-shard 1000
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="write WebDataset tar shards from a manifest", description=__doc__)
    p.add_argument("manifest", help="a .csv or .jsonl manifest (bind/data/manifest.py)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and index.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="samples per shard (1000)")
    p.add_argument("--max-shard-bytes", type=int, default=None, metavar="B", help="also start a new shard before B")
    p.add_argument("--split", default=None, help="keep only the rows of this split (default: all rows)")
    p.add_argument(
        "--text-column",
        action="append",
        default=None,
        metavar="NAME",
        help="a column holding text (default: each column none of whose cells names a file)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ._inputs import check_file

    if args.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {args.samples_per_shard}")
    check_file(args.manifest, "a .csv or .jsonl manifest")  # before the data package (and torch) loads

    from ..data.shard_writer import write_shards
    from ..data.shards import ShardIndex

    write_shards(
        args.manifest,
        args.out,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        split=args.split,
        text_columns=args.text_column,
        overwrite=args.overwrite,
    )
    index = ShardIndex.load(args.out)
    for file, count in zip(index.files, index.counts, strict=True):
        size = (index.directory / file).stat().st_size
        print(f"  {index.directory / file}  {count} samples  {_human(size)}")
    columns = ", ".join(f"{c} (.{'/.'.join(e)})" for c, e in index.columns.items())
    classes = f", {len(index.class_names)} classes" if index.class_names else ""
    print(f"{args.out}: {index.samples} samples in {len(index.files)} shards; columns {columns}{classes}")
    return 0


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
