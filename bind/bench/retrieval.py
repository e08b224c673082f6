"""``bindkit bench retrieval``: exact blocked search against FAISS and a naive numpy sort."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import best_time


def bench_retrieval(
    gallery_size: int = 1_000_000,
    dim: int = 256,
    queries: int = 256,
    k: int = 10,
    sort_queries: int = 8,
    repeats: int = 3,
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

    exact_s = best_time(lambda: exact_search(q, gallery, k), repeats)
    sort_s = best_time(lambda: np.argsort(-(q[:sort_queries] @ gallery.T), axis=1)[:, :k], 1)
    result: dict[str, Any] = {
        "gallery_size": gallery_size,
        "dim": dim,
        "queries": queries,
        "k": k,
        "exact_qps": queries / exact_s,
        "numpy_sort_qps": sort_queries / sort_s,
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
    result["exact_over_faiss_time"] = exact_s / faiss_s  # target <= 1.25
    result["exact_speedup_over_numpy_sort"] = result["exact_qps"] / result["numpy_sort_qps"]
    result["top1_agreement_with_faiss"] = float((exact_idx[:, 0] == faiss_idx[:, 0]).mean())
    return result
