"""Figures over several seeds: one run per seed, then the mean and spread of every number they report.

``bindkit run RECIPE --seeds 0 1 2`` trains the recipe once per seed into ``OUT/seed-N`` (each an
ordinary run directory) and writes ``OUT/seeds.json``: for every figure of ``eval.json`` (zero-shot
accuracies, retrieval metrics, the same for each of ``eval.sets``) its mean, sample standard
deviation, minimum, maximum and the value of each seed. A single seed can move a small model's
figure by several points; the mean and spread say how much of a difference is real.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..recipe import Recipe, changed_keys
from ..safe_io import read_json, write_atomic
from ..typed_yaml import read_recipe_file

SUMMARY_NAME = "seeds.json"


def flatten_figures(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of an ``eval.json`` by its dotted path (``zero_shot.audio.accuracy``), booleans and text dropped."""
    out: dict[str, float] = {}
    for key, value in results.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten_figures(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = float(value)
    return out


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``{seed: eval results}`` -> ``{"seeds": [...], "figures": {path: {mean, sd, min, max, values}}}``.

    A figure missing from some seed's results (an eval set added later) is summarised over the seeds that have it."""
    flat = {seed: flatten_figures(results) for seed, results in per_seed.items()}
    paths = list(dict.fromkeys(p for figures in flat.values() for p in figures))
    figures = {}
    for path in paths:
        values = {seed: figures[path] for seed, figures in flat.items() if path in figures}
        numbers = list(values.values())
        finite = all(math.isfinite(v) for v in numbers)  # a median rank is inf where no query finds its class
        figures[path] = {
            "mean": statistics.fmean(numbers),
            "sd": (statistics.stdev(numbers) if len(numbers) > 1 else 0.0) if finite else math.nan,
            "min": min(numbers),
            "max": max(numbers),
            "values": {str(seed): value for seed, value in values.items()},
        }
    return {"seeds": list(per_seed), "figures": figures}


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's ``eval.json``, or ``None`` when the run has not finished."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    try:
        results = read_json(path, "evaluation results as JSON", allow_nan=True)
    except DataError as err:  # bounded, UTF-8, no duplicate keys: bindkit's rules for JSON (bind.safe_io)
        reason = str(err).removeprefix(f"{path}: ")
        raise DataError(f"{path}: not a readable eval.json ({reason}); delete it to evaluate that seed again") from None
    if not isinstance(results, dict):
        raise DataError(f"{path}: expected a JSON object of evaluation results")
    return results


def same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Refuse a finished run whose ``recipe.yaml`` is not ``recipe`` (its eval.json would be kept as if it were)."""
    path = run_dir / "recipe.yaml"
    try:
        saved = read_recipe_file(path)
    except ConfigError as err:
        raise ConfigError(
            f"{err}; `bindkit run` writes it with eval.json: delete {run_dir} to run that seed again"
        ) from None
    changed = changed_keys(saved, recipe)
    if changed:
        raise ConfigError(
            f"--resume: {run_dir} was run with another recipe (keys: {', '.join(changed)}), so its eval.json is not "
            f"this recipe's figure; delete {run_dir} or give another --out"
        )


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    path = out / SUMMARY_NAME
    write_atomic(path, json.dumps(summary, indent=2).encode())
    return path


def format_summary(summary: dict[str, Any], keys: tuple[str, ...] = ("accuracy", "R@1")) -> str:
    """The zero-shot accuracies and R@1 figures as ``mean +- sd [min, max]`` lines."""
    lines = [f"over seeds {', '.join(map(str, summary['seeds']))}: mean +- sd [min, max]"]
    for path, f in summary["figures"].items():
        if path.rsplit(".", 1)[-1] in keys and math.isfinite(f["mean"]):
            lines.append(f"  {path:<48} {f['mean']:.3f} +- {f['sd']:.3f}  [{f['min']:.3f}, {f['max']:.3f}]")
    return "\n".join(lines)
