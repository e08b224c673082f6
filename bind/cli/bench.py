"""``bindkit bench NAME [key=value ...] [--json]``: measure speed and memory (never in tests).

Figures are ratios measured within one run. ``key=value`` pairs (values are YAML) override a
benchmark's keyword arguments, e.g. ``bindkit bench retrieval gallery_size=100000``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench import BENCHMARKS

    p = sub.add_parser("bench", help="run a benchmark", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark: " + ", ".join(sorted(BENCHMARKS)))
    p.add_argument("options", nargs="*", metavar="key=value", help="benchmark keyword arguments")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--gallery-size", type=int, help="retrieval: gallery rows (default 1,000,000)")
    p.set_defaults(func=run)


def parse_options(options: list[str]) -> dict[str, object]:
    import yaml

    kwargs = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"bench option {option!r}: expected key=value, e.g. gallery_size=100000")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def run(args: argparse.Namespace) -> int:
    from ..bench import run_benchmark

    kwargs = parse_options(args.options)
    if args.gallery_size:
        kwargs["gallery_size"] = args.gallery_size
    result = run_benchmark(args.name, **kwargs)
    if "torch" in sys.modules:  # the benchmarks that compute in this process (startup times other processes)
        result["torch_threads"] = sys.modules["torch"].get_num_threads()
    if args.json:
        print(json.dumps(result))
    else:
        _print_figures(result)
    return 0


def _print_figures(figures: dict, indent: int = 32) -> None:
    """One ``key: value`` line per figure; a nested mapping (a benchmark's checks) one line per entry, indented."""
    for key, value in figures.items():
        if isinstance(value, dict) and value:
            print(f"{key:>{indent}}:")
            _print_figures(value, indent + 4)
        else:
            print(f"{key:>{indent}}: {value:.4g}" if isinstance(value, float) else f"{key:>{indent}}: {value}")
