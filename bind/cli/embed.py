"""bindkit embed MODEL --modality M --out FILE.npy INPUT...: embed files or texts with a model.

MODEL is a training run, a folder written by BindModel.save_pretrained, or a hub id (org/name).

Writes FILE.npy (float32, one unit-norm row per item, in input order) and FILE.names.txt beside it
(the item of each row, one per line), which bindkit retrieve --gallery-embeddings reads. The two are
written as one unit: a write that fails (disk full, ulimit -f) leaves the previous pair as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..inputs import names_path
from ..safe_io import atomic_outputs
from ._inputs import (
    INPUTS_HELP,
    add_plugin_args,
    check_batch_size,
    check_device_name,
    check_input_files,
    embed_inputs,
    read_inputs,
    resolve_device,
)

if TYPE_CHECKING:
    import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed inputs with a model (a run, a saved folder, a hub id)", description=__doc__)
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUTS_HELP)
    p.add_argument("--modality", required=True, help="the modality of the inputs, e.g. text, image, audio")
    p.add_argument("--out", required=True, help="output .npy: float32 (N, D), unit-norm rows, input order")
    p.add_argument("--batch-size", type=int, default=64, help="items embedded at once (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # what needs no model first, in a fraction of a second: the options and the @LIST files
    check_batch_size(args.batch_size)
    check_device_name(args.device)
    check_input_files(args.inputs)

    from ..registry import load_plugins
    from ..runs import load_run

    device = resolve_device(args.device)
    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    items = read_inputs(model, args.modality, args.inputs)
    embeddings = embed_inputs(model.to(device), args.modality, items, args.batch_size)
    npy = npy_path(args.out)
    names = names_path(npy)
    write_gallery(npy, embeddings, items)
    print(f"{npy}: {embeddings.shape[0]} x {embeddings.shape[1]} float32 ({args.modality}); names in {names}")
    return 0


def npy_path(out: str | Path) -> Path:
    """The file ``--out`` names, as numpy would write it: ``.npy`` added when it lacks that suffix."""
    out = Path(out)
    return out if out.name.endswith(".npy") else out.with_name(out.name + ".npy")


def write_gallery(npy: Path, embeddings: np.ndarray, items: list[str]) -> None:
    """``npy`` and its names file as one unit (:func:`bind.safe_io.atomic_outputs`).

    Both are written whole to temporary files beside them first; only then are they renamed over the previous
    pair (the ``.npy``, then its names), and if the second rename fails the first is undone. So a write that
    fails (a full disk or ``ulimit -f``: the failures that happen while writing) leaves the previous pair
    byte for byte; only a crash between the two renames, microseconds apart, could pair a new ``.npy`` with old
    names (``bindkit retrieve`` refuses the pair when their counts differ)."""
    import numpy as np

    with atomic_outputs([npy, names_path(npy)]) as (npy_file, names_file):
        np.save(npy_file, embeddings)
        names_file.write(names_text(items).encode("utf-8"))


def names_text(items: list[str]) -> str:
    """One item per line (line breaks inside an item become spaces, so lines and rows stay one to one)."""
    return "".join(item.replace("\r", " ").replace("\n", " ") + "\n" for item in items)
