"""Benchmarks behind ``bindkit bench NAME --json``: each prints one JSON object of figures measured in one run.

Speed and memory are measured here, never in tests. Figures are ratios between methods measured
in the same process (or the same machine, one after the other), on the same data.
Each benchmark lives in its own module and is imported only when it runs; this module imports no torch
(``bindkit --help`` lists :data:`BENCHMARKS`), and :class:`PeakMemory` is loaded from :mod:`bind.bench.memory`
on first use.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

# name -> "module:function" (relative to this package)
BENCHMARKS: dict[str, str] = {
    "retrieval": "retrieval:bench_retrieval",
    "ddp": "ddp:bench_ddp",
    "cache": "cache:bench_cache",
    "gradcache": "gradcache:bench_gradcache",
    "gpu": "gpu:bench_gpu",
    "data": "data:bench_data",
    "step": "step:bench_step",
    "startup": "startup:bench_startup",
    "embed": "embed:bench_embed",
    "embed_memory": "embed:bench_embed_memory",
    "serve": "serve:bench_serve",
}


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up): the least disturbed measurement."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times(arms: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each arm over ``repeats`` rounds, the arms taking turns in each round, so that a busy
    machine slows them alike."""
    seconds = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


def get_benchmark(name: str) -> Callable[..., dict[str, Any]]:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    module, function = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def run_benchmark(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run benchmark ``name``; unknown keyword arguments are an error naming the known ones."""
    fn = get_benchmark(name)
    known = inspect.signature(fn).parameters
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"bench {name}: unknown option {key!r}; known: {', '.join(known)}")
    return fn(**kwargs)


def __getattr__(name: str) -> Any:
    """``bind.bench.PeakMemory``, imported (with torch) on first use."""
    if name == "PeakMemory":
        from .memory import PeakMemory

        return PeakMemory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
