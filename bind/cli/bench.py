"""``bindkit bench NAME [--json]``: measure speed (never in tests); figures are ratios within one run."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench import BENCHMARKS

    p = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--gallery-size", type=int, help="retrieval: gallery rows (default 1,000,000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import run_benchmark

    kwargs = {"gallery_size": args.gallery_size} if args.gallery_size else {}
    result = run_benchmark(args.name, **kwargs)
    result["torch_threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    return 0
