"""``bindkit bench startup``: how long the command takes to answer, each command a fresh process.

Runs ``bindkit --version``, ``bindkit --help`` and ``bindkit validate RECIPE`` (default: the digits recipe)
``repeats`` times each, in turns (one of each, then again), so a machine that gets busier slows all three alike.
Each is timed from start to exit: the interpreter, the imports, the command. Reported per command: the median
and the fastest run in seconds. The commands run as ``python -m bind`` with this interpreter, the code the
``bindkit`` script runs (``bind.cli:main``). A command that fails is an error, not a time.

Example: ``bindkit bench startup repeats=9 --json``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BindError, ConfigError

DIGITS = Path(__file__).parents[2] / "recipes" / "digits.yaml"


def startup_commands(recipe: str, data_root: str | None = None) -> dict[str, list[str]]:
    """name -> the bindkit arguments of each command timed."""
    validate = ["validate", recipe, *([f"data_root={data_root}"] if data_root else [])]
    return {"version": ["--version"], "help": ["--help"], "validate": validate}


def wall_time(argv: list[str]) -> float:
    """Seconds from start to exit of ``python -m bind ARGV`` in a fresh process; a failure raises, naming it."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bind", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BindError(f"bench startup: `bindkit {' '.join(argv)}` failed (exit {done.returncode}): {last}")
    return seconds


def bench_startup(repeats: int = 5, recipe: str = str(DIGITS), data_root: str | None = None) -> dict[str, Any]:
    """Median and fastest wall time of each command over ``repeats`` fresh processes (``data_root``: the
    validated recipe's, when its data is elsewhere)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"bench startup: repeats must be a positive number of runs, got {repeats!r}")
    commands = startup_commands(recipe, data_root)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            times[name].append(wall_time(argv))
    result: dict[str, Any] = {
        "repeats": repeats,
        "commands": {name: "bindkit " + " ".join(argv) for name, argv in commands.items()},
    }
    for name, seconds in times.items():
        result[f"{name}_median_s"] = statistics.median(seconds)
        result[f"{name}_min_s"] = min(seconds)
    return result
