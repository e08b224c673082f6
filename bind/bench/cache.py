"""``bindkit bench cache``: the digits binding stage, frozen trunks' features cached against recomputed.

The recipe's bind stage with the pairs whose trunks are frozen and not augmented (in
``recipes/digits.yaml``: text, a frozen MiniLM trunk with a trained head, and video, frames through
the frozen image trunk with a trained temporal head), with the frozen anchor. Augmented pairs (the
digits recipe's audio) are left out: they are never cached and would cost the same in both arms. Each arm trains two epochs of the stage's own step; the figure is
the second (steady) epoch, with the first epoch and the cache's build time alongside.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..data import build_dataset
from ..distributed import resolve_device
from ..recipe import Recipe, StageSpec, load_recipe
from ..train.stage import StageRunner
from ..train.trainer import configure_backends, prepare_model, seed_everything

DIGITS = Path(__file__).parents[2] / "recipes" / "digits.yaml"


def _epoch_times(runner: StageRunner, epochs: int) -> list[float]:
    """Wall time of each epoch of the stage's own optimizer steps (no logging, no checkpoints)."""
    iterators = runner.data.iterators()
    runner.model.train()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(runner.steps_per_epoch):
            runner.train_step(iterators)
        times.append(time.perf_counter() - start)
    return times


def cacheable_pairs(recipe: Recipe, stage: StageSpec) -> list[str]:
    """The stage's pairs whose features the cache can hold: trunk frozen (by the stage or the modality), not augmented."""
    return [
        m
        for m in stage.pairs
        if stage.freeze.get(m, recipe.modalities[m].freeze) in ("trunk", "all")
        and not recipe.modalities[m].train_data.augment
    ]


def bench_cache(
    recipe: str = str(DIGITS), pairs: tuple[str, ...] | None = None, data_root: str | None = None
) -> dict[str, Any]:
    """Both arms on ``pairs`` of the recipe's bind stage (default: those with frozen, unaugmented trunks)."""
    overrides = [f"data_root={data_root}"] if data_root else []
    spec = load_recipe(recipe, overrides)
    stage = next(s for s in spec.stages if s.kind == "bind")
    pairs = tuple(pairs or cacheable_pairs(spec, stage))
    stage.pairs = {m: stage.pairs[m] for m in pairs}
    device = resolve_device(spec.device)
    train_sets = {m: build_dataset(s.train_data, spec.data_root) for m, s in spec.modalities.items() if s.train_data}
    result: dict[str, Any] = {"recipe": str(recipe), "pairs": list(pairs), "device": device.type}
    with tempfile.TemporaryDirectory() as cache_dir:
        for arm in ("recompute", "memory", "disk", "disk_reuse"):
            spec.feature_cache = arm != "recompute"
            spec.cache_dir = cache_dir if arm.startswith("disk") else None
            seed_everything(spec.seed)
            configure_backends(spec.precision, device)
            model = prepare_model(spec, device)
            start = time.perf_counter()
            runner = StageRunner(model, spec, stage, device, train_sets)
            build = time.perf_counter() - start
            first, steady = _epoch_times(runner, 2)
            result[arm] = {"setup_s": build, "first_epoch_s": first, "epoch_s": steady}
            result["steps_per_epoch"] = runner.steps_per_epoch
            result["cached"] = sorted(runner.caches)
    recompute, memory = result["recompute"], result["memory"]
    result["speedup"] = recompute["epoch_s"] / memory["epoch_s"]  # target >= 5
    # one epoch including the one pass that fills the cache (the setup_s difference)
    build = memory["setup_s"] - recompute["setup_s"]
    result["speedup_first_epoch_with_build"] = recompute["first_epoch_s"] / (build + memory["first_epoch_s"])
    result["disk_speedup"] = recompute["epoch_s"] / result["disk"]["epoch_s"]
    return result
