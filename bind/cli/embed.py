"""bindkit embed MODEL --modality M --out FILE.npy INPUT...: embed files or texts with a model.

MODEL is a training run, a folder written by BindModel.save_pretrained, or a hub id (org/name).
Inputs are INPUT arguments, or a manifest's column (--manifest FILE.csv --column image), or WebDataset shards
written by bindkit shard (--shards DIR --column image).

Writes FILE.npy (float32, one unit-norm row per item, in input order) and FILE.names.txt beside it
(the item of each row, one per line), which bindkit retrieve --gallery-embeddings and bindkit serve read.
Rows are written as they come (memory stays flat for any corpus) into FILE.npy.partial/; an interrupted
embed resumes there when run again with the same inputs and model. Reader processes (--workers) read and
preprocess while the model runs; --nproc N splits the work over N processes here, and under torchrun
(RANK, WORLD_SIZE) over processes on several machines sharing the folder: the rows are the same either way.
The finished pair replaces the previous FILE.npy and FILE.names.txt as one unit.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..inputs import names_path
from ._inputs import (
    INPUTS_HELP,
    add_plugin_args,
    check_batch_size,
    check_device_name,
    check_file,
    check_input_files,
    read_inputs,
    resolve_device,
)

if TYPE_CHECKING:
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed inputs with a model (a run, a saved folder, a hub id)", description=__doc__)
    p.add_argument("run_dir", metavar="MODEL", help="a model folder (a run, e.g. runs/digits) or a hub id (org/name)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=INPUTS_HELP)
    p.add_argument("--modality", required=True, help="the modality of the inputs, e.g. text, image, audio")
    p.add_argument("--out", required=True, help="output .npy: float32 (N, D), unit-norm rows, input order")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--manifest", metavar="FILE", help="read the items from a .csv or .jsonl manifest's --column")
    source.add_argument("--shards", metavar="DIR", help="read the items from WebDataset shards (bindkit shard)")
    p.add_argument("--column", help="the manifest or shard column to embed (default: the modality)")
    p.add_argument("--batch-size", type=int, default=64, help="items embedded at once (default: 64)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="reader processes per process (default: none for texts, else the cores torch's threads leave idle "
        "or, beside a GPU, 1 per spare core; at most 4)",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes to split the work over on this machine (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_plugin_args(p)
    p.set_defaults(func=run)
    p.__class__ = _Intermixed


class _Intermixed(argparse.ArgumentParser):
    """INPUT arguments anywhere among the options, none at all with --manifest or --shards: argparse alone would
    give MODEL's neighbour INPUT... its empty match at once and refuse the INPUT arguments after an option."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201  argparse's own signature
        help_asked = args is not None and any(a in ("-h", "--help") for a in args)
        if self._inside or help_asked:  # intermixed parsing calls back here; its first pass would hide MODEL in help
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def run(args: argparse.Namespace) -> int:
    # what needs no model first, in a fraction of a second: the options and the @LIST files
    check_batch_size(args.batch_size)
    check_device_name(args.device)
    check_input_files(args.inputs)
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers: expected 0 or more reader processes, got {args.workers}")
    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected 1 or more processes, got {args.nproc}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and args.nproc > 1:
        raise ConfigError("--nproc: under torchrun (WORLD_SIZE is set) each process is one rank; leave --nproc out")
    sources = bool(args.inputs) + bool(args.manifest) + bool(args.shards)
    if sources != 1:
        raise ConfigError("give the items as INPUT arguments, or --manifest FILE, or --shards DIR (one of them)")
    if args.column and not (args.manifest or args.shards):
        raise ConfigError("--column: only with --manifest or --shards")
    if args.manifest:
        check_file(args.manifest, "a .csv or .jsonl manifest")
    if args.shards:
        check_file(Path(args.shards) / "index.json", "the index.json of shards written by `bindkit shard`")

    import torch

    from ..corpus import embed_corpus, partial_folder
    from ..registry import load_plugins
    from ..runs import load_run

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    load_plugins(args.plugin)
    model, _ = load_run(args.run_dir, args.plugin, trust_plugins=args.trust_plugins)
    model.to(device).eval()
    items, names = _items(model, args)
    npy = npy_path(args.out)
    common = dict(names=names, batch_size=args.batch_size, workers=args.workers)
    if args.nproc > 1:
        threads = max(1, torch.get_num_threads() // args.nproc)
        workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) // args.nproc - 1)
        torch.multiprocessing.start_processes(
            _rank_main,
            args=(args.nproc, model[args.modality], items, npy, {**common, "workers": workers}, threads),
            nprocs=args.nproc,
            start_method="fork",  # the children share the loaded model's memory, copy-on-write
        )
        finished = npy if npy.is_file() and not partial_folder(npy).exists() else None
    else:
        finished = embed_corpus(model[args.modality], items, npy, rank=rank, world_size=world_size, **common)
    if finished is None:
        print(f"rank {rank}: its chunks of {npy} are written; the last rank to finish writes {npy}")
        return 0
    print(f"{npy}: {len(items)} x {model.embed_dim} float32 ({args.modality}); names in {names_path(npy)}")
    return 0


def _rank_main(rank: int, world_size: int, encoder: Any, items: Any, npy: Path, common: dict, threads: int) -> None:
    import torch

    from ..corpus import embed_corpus

    torch.set_num_threads(threads)
    embed_corpus(encoder, items, npy, rank=rank, world_size=world_size, show_progress=rank == 0, **common)


def _items(model: Any, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The raw items to embed (random access: paths, texts, or members of shards) and each row's name."""
    from ..data.manifest import manifest
    from ..data.shards import shards
    from ._inputs import check_modality

    check_modality(model, args.modality)
    column = args.column or args.modality
    if args.manifest:
        found = manifest(Path.cwd(), "*", str(Path(args.manifest).resolve()), column)
        # path columns: the resolved paths (what retrieve and serve open); text columns: the texts
        return found, [str(found[i]) for i in range(len(found))]
    if args.shards:
        found = shards(Path.cwd(), "*", str(Path(args.shards).resolve()), column)
        return found, found.names
    items = read_inputs(model, args.modality, args.inputs)
    return items, items


def npy_path(out: str | Path) -> Path:
    """The file ``--out`` names, as numpy would write it: ``.npy`` added when it lacks that suffix."""
    out = Path(out)
    return out if out.name.endswith(".npy") else out.with_name(out.name + ".npy")
