"""``bindkit run RECIPE [key.sub=value ...]``: train a recipe's stages, save the model, evaluate it.

``--seeds 0 1 2`` trains once per seed into ``OUT/seed-N`` and writes ``OUT/seeds.json``, the mean and spread of
every figure (:mod:`bind.train.multiseed`); with ``--resume`` the seeds already evaluated are kept as they are.

``--nproc N`` trains data-parallel on N processes of this machine (``torchrun --standalone``; one
GPU each on CUDA, gloo on CPU); ``torchrun --nproc_per_node N -m bind run RECIPE`` does the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._inputs import add_plugin_args
from .data import load_recipe_fetching_data, read_recipe_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train a recipe", description=__doc__)
    p.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (values are YAML)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE_NAME)")
    add_plugin_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="data-parallel processes on this machine")
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        choices=["yes", "auto"],
        help="continue from the newest checkpoint in the run directory; `--resume auto`: when there is one, else "
        "start (restarted torchrun workers resume so by themselves)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="run once per seed into OUT/seed-N and report each figure's mean and spread (OUT/seeds.json)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = read_recipe_args(args)  # a missing file, bad YAML or a bad override: one line before torch loads
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds: each seed once, got {' '.join(map(str, args.seeds))}")

    from ..distributed import check_nproc
    from ..registry import load_plugins

    check_nproc(args.nproc)
    load_plugins(args.plugin)
    recipe = load_recipe_fetching_data(args, data)  # fail here, before any process starts; fetch data on a first run
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    if args.seeds is None:
        return _run_one(args, recipe, args.overrides, out, resume_wanted(args.resume, out))
    return _run_seeds(args, out)


def resume_wanted(mode: str | None, out: Path) -> bool:
    """``--resume``: yes; ``--resume auto``, or a worker torchrun restarted after a failure (its
    ``TORCHELASTIC_RESTART_COUNT`` > 0): when the run directory holds a checkpoint."""
    import os

    from ..train.checkpoint import list_checkpoints

    if mode == "yes":
        return True
    if mode == "auto" or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return bool(list_checkpoints(out / "checkpoints", complete=False))
    return False


def _run_seeds(args: argparse.Namespace, out: Path) -> int:
    from ..recipe import load_recipe
    from ..train.checkpoint import list_checkpoints
    from ..train.multiseed import format_summary, read_eval, same_recipe, summarize_seeds, write_summary

    per_seed = {}
    for seed in args.seeds:
        seed_out = out / f"seed-{seed}"
        overrides = [*args.overrides, f"seed={seed}"]
        recipe = load_recipe(args.recipe, overrides, trust_plugins=args.trust_plugins)
        done = read_eval(seed_out) if args.resume else None
        if done is not None:
            same_recipe(seed_out, recipe)  # a kept figure must come from this recipe at this seed
            print(f"seed {seed}: evaluated already in {seed_out} (kept)")
        else:
            # --resume continues a seed that has checkpoints; a seed never started (or killed before its first) starts
            resume = bool(args.resume) and bool(list_checkpoints(seed_out / "checkpoints", complete=False))
            code = _run_one(args, recipe, overrides, seed_out, resume)
            if code:
                return code
            done = read_eval(seed_out)
        if done is None:
            raise ConfigError(f"{seed_out}: the run left no eval.json")
        per_seed[seed] = done
    summary = summarize_seeds(per_seed)
    print(format_summary(summary))
    print(f"summary: {write_summary(out, summary)}")
    return 0


def _run_one(args: argparse.Namespace, recipe: Any, overrides: list[str], out: Path, resume: bool) -> int:
    import os

    from ..distributed import launch
    from ..evaluate import format_results
    from ..train.monitor import format_stage_summaries, stage_summaries
    from ..train.trainer import run_recipe

    if args.nproc > 1:
        from ..train.runlock import run_lock

        with run_lock(out):  # a live run there is refused here, in one line, before torchrun starts workers
            pass
        flags = [flag for flag, on in (("--debug", args.debug), ("--verbose", args.verbose)) if on]
        argv = [*flags, "run", args.recipe, *overrides, "--out", str(out)]
        argv += [f"--plugin={module}" for module in args.plugin]
        argv += [
            flag
            for flag, on in (
                ("--no-progress", args.no_progress),
                ("--resume", resume),
                ("--trust-plugins", args.trust_plugins),
            )
            if on
        ]
        return launch(args.nproc, argv, debug=args.debug)
    results = run_recipe(recipe, out, show_progress=not args.no_progress, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(format_results(results))
    summaries = stage_summaries(out / "metrics.jsonl")
    if summaries:
        print(format_stage_summaries(summaries))
    print(f"run directory: {out}  (model.safetensors, config.json, metrics.jsonl, eval.json)")
    return 0
