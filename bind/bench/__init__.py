"""Benchmarks behind ``bindkit bench NAME --json``: each prints one JSON object of figures measured in one run.

Speed and memory are measured here, never in tests. Figures are ratios between methods measured
in the same process (or the same machine, one after the other), on the same data.
Each benchmark lives in its own module and is imported only when it runs.
"""

from __future__ import annotations

import importlib
import inspect
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors allocated inside the ``with`` block and alive at the same time.

    On CUDA this is ``torch.cuda.max_memory_allocated`` above what was allocated on entry. On the
    CPU, which keeps no such counter, every storage an operator creates (autograd's backward ones
    included) is counted until it is freed; RSS would hide reuse inside the allocator.

    Example::

        with PeakMemory(device) as mem:
            loss.backward()
        print(mem.peak_bytes)
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.live = self.peak_bytes = 0
        self._seen: set[int] = set()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._seen:  # views share their base's storage
                    self._seen.add(key)
                    self.live += size
                    self.peak_bytes = max(self.peak_bytes, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


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
