"""``bindkit bench retrieval``: exact blocked search against the machine (the roofline), FAISS and a numpy sort.

The roofline is the plain matrix product of the same queries with the same gallery, in the same cache-sized
blocks, with no selection and no output kept: what search would cost if choosing the top k were free.
``roofline_fraction`` = exact search's queries/s over the roofline's. Which BLAS kernels torch, numpy and FAISS
picked (threadpoolctl) is reported, since a library on a generic kernel makes any comparison with it unfair.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import best_time


def bench_retrieval(
    gallery_size: int = 1_000_000,
    dim: int = 256,
    queries: int = 256,
    k: int = 10,
    sort_queries: int = 8,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact blocked search vs FAISS ``IndexFlatIP`` vs a naive numpy full sort, queries per second."""
    from ..retrieval import exact_search

    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    q = gallery[rng.choice(gallery_size, queries, replace=False)] + 0.01 * rng.standard_normal(
        (queries, dim), dtype=np.float32
    )

    import torch

    q_t, g_t = torch.from_numpy(q), torch.from_numpy(gallery)

    def roofline(block: int) -> Callable[[], None]:
        scratch = torch.empty(queries, block)

        def product() -> None:
            for start in range(0, gallery_size, block):
                rows = g_t[start : start + block]
                torch.mm(q_t, rows.T, out=scratch[:, : len(rows)])

        return product

    # this machine's best block for the bare product; timings interleaved with exact search's, best of each,
    # so that a neighbour's load on a shared machine hits both sides alike
    candidates = {block: roofline(block) for block in (1024, 2048, 4096, 8192)}
    exact_times, roofline_times = [], {block: [] for block in candidates}
    exact_search(q, gallery, k)
    for _ in range(repeats):
        for block, product in candidates.items():
            start = time.perf_counter()
            product()
            roofline_times[block].append(time.perf_counter() - start)
        start = time.perf_counter()
        exact_search(q, gallery, k)
        exact_times.append(time.perf_counter() - start)
    roofline_block = min(roofline_times, key=lambda b: min(roofline_times[b]))
    roofline_s, exact_s = min(roofline_times[roofline_block]), min(exact_times)
    sort_s = best_time(lambda: np.argsort(-(q[:sort_queries] @ gallery.T), axis=1)[:, :k], 1)
    result: dict[str, Any] = {
        "gallery_size": gallery_size,
        "dim": dim,
        "queries": queries,
        "k": k,
        "exact_qps": queries / exact_s,
        "roofline_qps": queries / roofline_s,
        "roofline_gflops": 2 * queries * gallery_size * dim / roofline_s / 1e9,
        "roofline_block": roofline_block,
        "roofline_fraction": roofline_s / exact_s,  # target >= 0.8
        "numpy_sort_qps": sort_queries / sort_s,
        "torch_threads": torch.get_num_threads(),
    }
    _, exact_idx = exact_search(q, gallery, k)
    try:
        import faiss
    except ImportError:
        result["faiss_qps"] = None
        result["note"] = "faiss-cpu not installed: pip install 'bindkit[faiss]'"
        return result
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    faiss_s = best_time(lambda: index.search(q, k), repeats)
    _, faiss_idx = index.search(q, k)
    result["faiss_qps"] = queries / faiss_s
    result["blas"] = _blas_kernels()
    result["exact_over_faiss_time"] = exact_s / faiss_s  # target <= 1.25
    result["exact_speedup_over_numpy_sort"] = result["exact_qps"] / result["numpy_sort_qps"]
    result["top1_agreement_with_faiss"] = float((exact_idx[:, 0] == faiss_idx[:, 0]).mean())
    return result


def _blas_kernels() -> list[dict[str, Any]]:
    """Each BLAS/OpenMP library loaded in this process: its file, API, the CPU kernel it chose, its threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    import torch

    torch_blas = {  # torch links its BLAS statically, out of threadpoolctl's sight
        "library": f"torch {torch.__version__}",
        "api": "mkl" if torch.backends.mkl.is_available() else "other",
        "architecture": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    return [torch_blas] + [
        {
            "library": info.get("filepath", "").rsplit("/", 1)[-1],
            "api": info.get("internal_api"),
            "architecture": info.get("architecture"),
            "threads": info.get("num_threads"),
        }
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
