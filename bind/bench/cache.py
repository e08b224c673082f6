"""``bindkit bench cache``: the digits binding stage, frozen trunks' features cached against recomputed.

The recipe's bind stage with the pairs whose towers are frozen, as in ``recipes/digits.yaml``: the
image anchor (frozen), text (frozen MiniLM trunk, trained head) and video (frames through the frozen
image trunk, trained temporal head). Audio is left out: it is augmented, so it is never cached and
would cost the same in both arms. Each arm trains two epochs of the stage's own step; the figure is
the second (steady) epoch, with the first epoch and the cache's build time alongside.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..data import build_dataset
from ..recipe import load_recipe
from ..stage import StageRunner, endless
from ..trainer import build_model, resolve_device, seed_everything

DIGITS = Path(__file__).parents[2] / "recipes" / "digits.yaml"


def _epoch_times(runner: StageRunner, epochs: int) -> list[float]:
    """Wall time of each epoch of optimizer steps (no logging, no checkpoints)."""
    iterators = {m: endless(loader) for m, loader in runner.loaders.items()}
    runner.model.train()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(runner.steps_per_epoch):
            runner.backward(iterators)
            runner.optimizer.step()
            runner.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def bench_cache(
    recipe: str = str(DIGITS), pairs: tuple[str, ...] = ("text", "video"), data_root: str | None = None
) -> dict[str, Any]:
    overrides = [f"data_root={data_root}"] if data_root else []
    spec = load_recipe(recipe, overrides)
    stage = next(s for s in spec.stages if s.kind == "bind")
    stage.pairs = {m: stage.pairs[m] for m in pairs}
    device = resolve_device(spec.device)
    train_sets = {m: build_dataset(s.train_data, spec.data_root) for m, s in spec.modalities.items() if s.train_data}
    result: dict[str, Any] = {"recipe": str(recipe), "pairs": list(pairs), "device": device.type}
    with tempfile.TemporaryDirectory() as cache_dir:
        for arm in ("recompute", "memory", "disk", "disk_reuse"):
            spec.feature_cache = arm != "recompute"
            spec.cache_dir = cache_dir if arm.startswith("disk") else None
            seed_everything(spec.seed)
            model = build_model(spec).to(device)
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
