"""Cross-modal search over unit-norm embeddings.

Exact search is a blocked matrix product with a running top-k: the gallery is processed in blocks
of ``block_size`` rows, so memory stays at ``queries x block_size`` scores whatever the gallery
size, and the gallery itself may be a memory-mapped ``.npy`` larger than RAM. ``SearchIndex`` wraps
it with names and saving; ``backend="faiss"`` uses FAISS ``IndexFlatIP`` when ``faiss-cpu`` is
installed (the ``faiss`` extra).

Example::

    model, _ = load_run("runs/digits")
    gallery = SearchIndex(model.embed("image", image_paths).numpy(), names=image_paths)
    hits = gallery.search(model.embed("audio", ["seven.wav"]).numpy(), k=5)   # [[(name, score), ...]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError


def exact_search(
    queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int, block_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` gallery rows by inner product for each query: ``(scores (Q, k), indices (Q, k))``, best first.

    Memory: one ``(Q, block_size)`` block of scores at a time, never ``(Q, N)``.
    """
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    n = len(gallery)
    if q.ndim != 2 or (n and q.shape[1] != gallery.shape[1]):
        raise ConfigError(f"queries of shape {tuple(q.shape)} do not match a gallery of dimension {gallery.shape[1]}")
    k = min(k, n)
    best_scores = torch.full((len(q), 0), -torch.inf)
    best_index = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, n, block_size):
        rows = np.ascontiguousarray(gallery[start : start + block_size], dtype=np.float32)
        block = torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # memory-mapped rows are read-only
        scores = q @ block.T  # (Q, block)
        top_scores, top_index = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_index = torch.cat([best_index, top_index + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_index = merged_index.gather(1, order)
    return best_scores.numpy(), best_index.numpy()


class SearchIndex:
    """Gallery embeddings with their names; exact blocked search or FAISS ``IndexFlatIP``."""

    def __init__(self, embeddings: np.ndarray, names: Sequence[str] | None = None, backend: str = "exact") -> None:
        if embeddings.ndim != 2:
            raise ConfigError(f"gallery embeddings must be (N, D), got shape {embeddings.shape}")
        if names is not None and len(names) != len(embeddings):
            raise ConfigError(f"{len(names)} gallery names for {len(embeddings)} gallery embeddings")
        if backend not in ("exact", "faiss"):
            raise ConfigError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        self.embeddings = embeddings
        self.names = list(names) if names is not None else [str(i) for i in range(len(embeddings))]
        self.backend = backend
        self._faiss = _faiss_index(embeddings) if backend == "faiss" else None

    def __len__(self) -> int:
        return len(self.embeddings)

    def search_indices(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._faiss is not None:
            return self._faiss.search(queries, min(k, len(self)))
        return exact_search(queries, self.embeddings, k)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each query, the top ``k`` gallery items as ``(name, score)``."""
        scores, indices = self.search_indices(queries, k)
        return [
            [(self.names[i], float(s)) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores, indices, strict=True)
        ]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``embeddings.npy`` + ``names.json`` (+ ``index.faiss``) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32))
        (directory / "names.json").write_text(json.dumps({"backend": self.backend, "names": self.names}))
        if self._faiss is not None:
            import faiss

            faiss.write_index(self._faiss, str(directory / "index.faiss"))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True) -> SearchIndex:
        """Load a saved index; ``mmap`` leaves exact-search embeddings on disk until searched."""
        directory = Path(directory)
        for name in ("embeddings.npy", "names.json"):
            if not (directory / name).is_file():
                raise DataError(f"{directory / name} is missing: not a saved bindkit search index")
        meta = json.loads((directory / "names.json").read_text())
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r" if mmap else None)
        index = cls.__new__(cls)
        index.embeddings, index.names, index.backend = embeddings, meta["names"], meta["backend"]
        index._faiss = None
        if index.backend == "faiss":
            faiss = _import_faiss()
            index._faiss = faiss.read_index(str(directory / "index.faiss"))
        return index


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ConfigError("backend 'faiss' needs faiss-cpu: pip install 'bindkit[faiss]'") from err
    return faiss


def _faiss_index(embeddings: np.ndarray):
    faiss = _import_faiss()
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index
