"""``bindkit encoders``: list registered encoders as a table or JSON."""

from __future__ import annotations

import argparse
import inspect
import json

from ..errors import ConfigError, did_you_mean


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoders", help="list registered encoders", description=__doc__)
    p.add_argument("pattern", nargs="?", default="*", help="glob over names, e.g. 'hf_*'")
    p.add_argument("--modality", help="only encoders of this modality")
    p.add_argument("--pretrained", action="store_true", help="only encoders that load released weights, and from where")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE to register encoders")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=run)


def _count_parameters(name: str) -> int | None:
    """Parameters of the default variant: built on the meta device (no memory) where it can be, else for real."""
    import torch

    from ..registry import create_encoder, get_encoder_info

    # released towers refuse to build without weights unless random weights are asked for outright
    takes = inspect.signature(get_encoder_info(name).factory).parameters
    kwargs = {"random_init": True} if "random_init" in takes else {}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return sum(p.numel() for p in create_encoder(name, **kwargs).parameters())
        except Exception:  # encoders that need a local model directory cannot be built without one
            continue
    return None


def run(args: argparse.Namespace) -> int:
    from ..registry import get_encoder_info, list_encoders, list_modalities, load_plugins

    load_plugins(args.plugin)
    if args.modality and args.modality not in list_modalities():
        raise ConfigError(
            f"--modality: no encoder is registered for {args.modality!r}; "
            f"{did_you_mean(args.modality, list_modalities())}known: {', '.join(list_modalities())}"
        )
    rows = []
    for name in list_encoders(args.pattern, modality=args.modality, pretrained=args.pretrained):
        info = get_encoder_info(name)
        row = {
            "name": name,
            "modality": info.modality,
            "parameters": _count_parameters(name),
            "pretrained": info.pretrained,
            "module": info.module,
            "augmenter": getattr(info.augmenter, "__name__", None),  # what a recipe's augment: configures
            "description": info.description,
        }
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no encoders match {args.pattern!r}" + (f" for modality {args.modality!r}" if args.modality else ""))
        return 1
    columns = ["name", "modality", "parameters", "pretrained", "description"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    return str(value)
