"""Peak tensor memory of a block of code, on CUDA or the CPU (:class:`PeakMemory`, also ``bind.bench.PeakMemory``).

Its own module so that ``bind.bench`` (the benchmarks' names, read by ``bindkit --help``) does not import torch.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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
