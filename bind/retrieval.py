"""Cross-modal search over unit-norm embeddings.

Exact search is a blocked matrix product with a running top-k: the gallery is processed in blocks
of ``block_size`` rows, so memory stays at ``queries x block_size`` scores whatever the gallery
size (a block's scores are compared with each query's current k-th best; only those above it are merged), and the gallery itself may be a memory-mapped ``.npy`` larger than RAM. ``SearchIndex`` wraps
it with names and saving; ``backend="faiss"`` uses FAISS ``IndexFlatIP`` when ``faiss-cpu`` is
installed (the ``faiss`` extra). Both order equal scores by gallery row, earlier first (a stable sort's order).
``SearchIndex(..., ann=...)`` searches an approximate index instead (:mod:`bind.ann`, ``bindkit index``), which
:func:`open_gallery` picks up beside the ``.npy`` by default.

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
from typing import Any

import numpy as np
import torch

from .ann import import_faiss, index_path, load_ann
from .errors import ConfigError, DataError, InputError
from .inputs import names_path
from .safe_io import atomic_outputs, read_json, text_lines


def exact_search(
    queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int, block_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` gallery rows by inner product for each query: ``(scores (Q, k), indices (Q, k))``, best first.

    Memory: one ``(Q, block_size)`` block of scores at a time, never ``(Q, N)``; the default block stays in the
    CPU's cache. Once every query holds ``k`` results, a block's scores are only compared with each query's
    current ``k``-th best score, and the few that beat it are merged: the selection costs one comparison per
    score instead of a top-k over every block. Equal scores keep the earlier gallery row, as
    ``np.argsort(-scores, kind="stable")`` orders them, whatever the block size.
    """
    check_k(k)
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    n = len(gallery)
    if q.ndim != 2 or (n and q.shape[1] != gallery.shape[1]):
        raise ConfigError(f"queries of shape {tuple(q.shape)} do not match a gallery of dimension {gallery.shape[1]}")
    k = min(k, n)
    best_scores = torch.full((len(q), 0), -torch.inf)
    best_index = torch.zeros((len(q), 0), dtype=torch.long)
    buffer = torch.empty(len(q), min(block_size, n))  # one allocation: a fresh (Q, block) per block faults pages in
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # candidates not merged yet

    def flush() -> None:  # merge the pending candidates into the queries they beat (few queries, few rows)
        if pending:
            queries_, scores_, index_ = (torch.cat(parts) for parts in zip(*pending, strict=True))
            pending.clear()
            hit, rows = torch.unique(queries_, return_inverse=True)
            best_scores[hit], best_index[hit] = _merge(best_scores[hit], best_index[hit], rows, scores_, index_)

    for start in range(0, n, block_size):
        rows = np.ascontiguousarray(gallery[start : start + block_size], dtype=np.float32)
        block = torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # memory-mapped rows are read-only
        scores = torch.mm(q, block.T, out=buffer[:, : len(block)])  # (Q, block)
        if best_scores.shape[1] == k and len(q):
            # as of the last merge: candidates merged late are a few more, no error. Strictly above it: a later row
            # equal to a current result never displaces it (equal scores keep the earlier row)
            threshold = best_scores[:, -1]
            hit = (scores.amax(dim=1) > threshold).nonzero().squeeze(1)  # the queries a block improves: usually few
            if not len(hit):
                continue
            hit_rows, cols = (scores[hit] > threshold[hit, None]).nonzero(as_tuple=True)
            if len(hit_rows) <= 4 * k * len(q):  # the usual case: few scores beat the k-th best
                if len(hit_rows):
                    queries_ = hit[hit_rows]
                    pending.append((queries_, scores[queries_, cols], cols + start))
                    if sum(len(p[0]) for p in pending) >= k * len(q):
                        flush()
                continue
        flush()
        top_scores, top_index = _block_top(scores, min(k, scores.shape[1]))
        # every current result is an earlier row than this block's: a stable sort keeps them first among equals
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_index = torch.cat([best_index, top_index + start], dim=1)
        best_scores, order = merged_scores.sort(dim=1, descending=True, stable=True)
        best_scores, best_index = best_scores[:, :k], merged_index.gather(1, order[:, :k])
    flush()
    return best_scores.numpy(), best_index.numpy()


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` best columns, ordered by (score descending, column ascending): equal scores keep the
    earlier column, as a stable sort of the whole row would, for the price of one ``topk``."""
    take = min(k + 1, scores.shape[1])  # one more than asked: it shows whether the k-th score is tied outside
    top_scores, top_index = scores.topk(take, dim=1)  # which of several equal scores it picks, and their order: any
    if take > k:
        # a row whose (k+1)-th score equals its k-th: topk may have kept a later column of that score
        short = (top_scores[:, k] == top_scores[:, k - 1]).nonzero().squeeze(1)
        top_scores, top_index = top_scores[:, :k], top_index[:, :k]
        if len(short):
            rows, kth = scores[short], top_scores[short, -1:]
            equal = rows == kth
            wanted = (top_scores[short] == kth).sum(1, keepdim=True)
            keep = (rows > kth) | (equal & (equal.cumsum(1) <= wanted))  # exactly k per row: the first equal ones
            top_index[short] = keep.nonzero(as_tuple=True)[1].view(len(short), k)  # row-major: columns ascending
            top_scores[short] = rows.gather(1, top_index[short])
    if (top_scores[:, 1:] == top_scores[:, :-1]).any():  # topk sorts by score only: order equal ones by column
        top_index, order = top_index.sort(dim=1)
        top_scores, order = top_scores.gather(1, order).sort(dim=1, descending=True, stable=True)
        top_index = top_index.gather(1, order)
    return top_scores, top_index


def _merge(
    best_scores: torch.Tensor, best_index: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` best of its current results and the candidates ``(rows, scores, index)``."""
    if not len(rows):
        return best_scores, best_index
    num_queries, k = best_scores.shape
    all_rows = torch.cat([torch.arange(num_queries).repeat_interleave(k), rows])
    all_scores = torch.cat([best_scores.reshape(-1), scores])
    all_index = torch.cat([best_index.reshape(-1), index])
    order = torch.sort(all_scores, descending=True, stable=True).indices  # best first; earlier rows win ties
    order = order[torch.sort(all_rows[order], stable=True).indices]  # grouped by query, best first within
    counts = torch.bincount(all_rows, minlength=num_queries)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    keep = order[rank < k]  # every query has at least its k current results
    return all_scores[keep].view(num_queries, k), all_index[keep].view(num_queries, k)


def check_k(k: int) -> None:
    """Raise :class:`ConfigError` unless ``k`` is a positive number of results."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k: expected a positive number of results per query, got {k!r}")


def check_finite(array: np.ndarray, where: str, block_rows: int = 65536) -> None:
    """Raise :class:`InputError` naming ``where`` and the first bad row when ``array`` holds NaN or inf.

    Reads ``block_rows`` rows at a time, so a memory-mapped gallery larger than RAM is never loaded whole.
    """
    for start in range(0, len(array), block_rows):
        block = np.asarray(array[start : start + block_rows])
        bad = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))
        if len(bad):
            raise InputError(
                f"{where}: row {start + int(bad[0])} holds NaN or infinite values; expected finite embeddings "
                "(unit-norm rows from `bindkit embed`): embed the items again"
            )


def load_embeddings(path: str | os.PathLike[str], width: int | None = None, mmap: bool = True) -> np.ndarray:
    """An ``(N, width)`` float ``.npy`` file of finite embeddings, memory-mapped unless ``mmap`` is False.

    Anything else (not a ``.npy``, pickled objects, integers, another shape, NaN or inf) is one
    :class:`DataError` (:class:`ConfigError` for the width) naming the file. No pickle is ever loaded.
    """
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # pickles, .npz members, truncated or foreign files
        raise DataError(
            f"{path}: not a readable .npy array ({err}); expected embeddings saved by `bindkit embed`"
        ) from None
    if not isinstance(array, np.ndarray):  # a .npz archive loads as a mapping of arrays
        array.close()
        raise DataError(f"{path}: a .npz archive, not a .npy array; expected embeddings saved by `bindkit embed`")
    if array.dtype.kind != "f":
        raise DataError(f"{path}: embeddings of dtype {array.dtype}; expected float32 (saved by `bindkit embed`)")
    if array.ndim != 2 or (width is not None and array.shape[1] != width):
        raise ConfigError(f"{path}: expected (N, {width or 'D'}) embeddings from this run, got shape {array.shape}")
    check_finite(array, str(path))
    return array


def open_gallery(
    npy: str | os.PathLike[str],
    names: str | os.PathLike[str] | None = None,
    width: int | None = None,
    backend: str = "auto",
    index: str | os.PathLike[str] | None = None,
) -> SearchIndex:
    """A gallery written by ``bindkit embed``: ``npy`` memory-mapped and checked (:func:`load_embeddings`), with
    the names in ``names`` (default: the ``.names.txt`` beside it, when there is one; else row numbers).

    ``backend``: ``"auto"`` searches with the approximate index ``index`` (default ``X.index`` beside ``X.npy``,
    built by ``bindkit index``) when it exists, else exactly; ``"ann"`` requires that index; ``"exact"`` and
    ``"faiss"`` ignore it. A names file whose line count differs from the rows, an index built from other
    embeddings, or any other problem, is one error naming the file."""
    npy = Path(npy)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not npy.is_file():
        raise DataError(
            f"{npy}: {'a folder' if npy.is_dir() else 'not found'}; expected embeddings from `bindkit embed`"
        )
    embeddings = load_embeddings(npy, width=width)  # memory-mapped; dtype, shape and NaN/inf checked
    ann = None
    if backend == "ann" or (backend == "auto" and Path(index or index_path(npy)).is_file()):
        ann = load_ann(npy, embeddings, index)
    backend = "faiss" if backend == "faiss" else "exact"
    if names is None and names_path(npy).is_file():
        names = names_path(npy)
    rows = None
    if names is not None:
        with open(names, "rb") as f:  # one name per line, each bounded (bind.safe_io)
            rows = [line.rstrip("\r\n") for line in text_lines(f, Path(names))]
        if len(rows) != len(embeddings):
            raise ConfigError(f"{names}: {len(rows)} names for {len(embeddings)} gallery rows in {npy}")
    return SearchIndex(embeddings, rows, backend=backend, checked=True, ann=ann)


BACKENDS = ("auto", "exact", "faiss", "ann")


class SearchIndex:
    """Gallery embeddings with their names; exact blocked search, FAISS ``IndexFlatIP``, or an approximate index.

    ``ann``: an :class:`bind.ann.AnnIndex` of these embeddings (:func:`bind.ann.load_ann` or
    :func:`bind.ann.build_index`); when given, searches use it (``backend`` is then ``"ann"``) and may miss some of
    the exact top k (its ``recall_at_10`` says how many)."""

    def __init__(
        self,
        embeddings: np.ndarray,
        names: Sequence[str] | None = None,
        backend: str = "exact",
        *,
        checked: bool = False,
        ann: Any = None,
    ) -> None:
        """``checked``: the embeddings come from :func:`load_embeddings`, which scanned them for NaN already."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().numpy()
        if embeddings.ndim != 2:
            raise ConfigError(f"gallery embeddings must be (N, D), got shape {embeddings.shape}")
        if embeddings.dtype.kind != "f":
            raise InputError(f"gallery embeddings have dtype {embeddings.dtype}; expected float32 (or another float)")
        if names is not None and len(names) != len(embeddings):
            raise ConfigError(f"{len(names)} gallery names for {len(embeddings)} gallery embeddings")
        if backend not in ("exact", "faiss"):
            raise ConfigError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        if not checked:  # NaN rows would come back as +nan scores
            check_finite(embeddings, "gallery embeddings")
        self.embeddings = embeddings
        self.names = list(names) if names is not None else [str(i) for i in range(len(embeddings))]
        if ann is not None and (ann.index.ntotal != len(embeddings) or ann.index.d != embeddings.shape[1]):
            raise ConfigError(
                f"an approximate index of {ann.index.ntotal} x {ann.index.d} vectors for a gallery of "
                f"{len(embeddings)} x {embeddings.shape[1]}: build it from these embeddings"
            )
        self.ann = ann
        self.backend = "ann" if ann is not None else backend
        self._faiss = _faiss_index(embeddings) if backend == "faiss" and ann is None else None

    def __len__(self) -> int:
        return len(self.embeddings)

    def search_indices(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_k(k)
        try:
            queries = np.ascontiguousarray(queries, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InputError(f"queries: expected an (N, D) float array, got {type(queries).__name__} ({err})") from None
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ConfigError(
                f"queries of shape {queries.shape} do not match a gallery of dimension {self.embeddings.shape[1]}"
            )
        check_finite(queries, "queries")
        if self.ann is not None:
            return self.ann.search(queries, k, self.embeddings)
        if self._faiss is not None:
            return _faiss_search(self._faiss, queries, min(k, len(self)))
        return exact_search(queries, self.embeddings, k)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each query, the top ``k`` gallery items as ``(name, score)``."""
        scores, indices = self.search_indices(queries, k)
        return [  # an approximate index may find fewer than k (row -1)
            [(self.names[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, indices, strict=True)
        ]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``embeddings.npy`` + ``names.json`` (+ ``index.faiss``) in ``directory``, written as one unit: a write
        that fails (a full disk) leaves the previous index as it was. An approximate index is not saved here: it
        lives beside its ``.npy`` (``bindkit index``); this folder reloads as exact search."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / "embeddings.npy", directory / "names.json"]
        faiss_bytes = None
        if self._faiss is not None:
            import faiss

            faiss_bytes = faiss.serialize_index(self._faiss).tobytes()
            paths.append(directory / "index.faiss")
        with atomic_outputs(paths) as files:
            np.save(files[0], np.asarray(self.embeddings, dtype=np.float32))
            backend = "exact" if self.backend == "ann" else self.backend
            files[1].write(json.dumps({"backend": backend, "names": self.names}).encode())
            if faiss_bytes is not None:
                files[2].write(faiss_bytes)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True) -> SearchIndex:
        """Load a saved index; ``mmap`` leaves exact-search embeddings on disk until searched."""
        directory = Path(directory)
        for name in ("embeddings.npy", "names.json"):
            if not (directory / name).is_file():
                raise DataError(f"{directory / name} is missing: not a saved bindkit search index")
        meta = read_json(directory / "names.json", "a search index's names (SearchIndex.save)", MAX_NAMES_BYTES)
        if not (
            isinstance(meta, dict) and meta.get("backend") in ("exact", "faiss") and isinstance(meta.get("names"), list)
        ):
            raise DataError(f"{directory / 'names.json'}: expected {{backend: exact|faiss, names: [...]}}")
        embeddings = load_embeddings(directory / "embeddings.npy", mmap=mmap)
        if len(meta["names"]) != len(embeddings):
            raise DataError(
                f"{directory / 'names.json'}: {len(meta['names'])} names for {len(embeddings)} rows of embeddings.npy"
            )
        index = cls.__new__(cls)
        index.embeddings, index.names, index.backend = embeddings, meta["names"], meta["backend"]
        index._faiss, index.ann = None, None
        if index.backend == "faiss":
            faiss = import_faiss("backend 'faiss'")
            path = directory / "index.faiss"
            try:
                index._faiss = faiss.read_index(str(path))
            except RuntimeError as err:  # faiss reports a missing or damaged file as its own RuntimeError
                raise DataError(f"{path}: not a readable FAISS index ({str(err).splitlines()[0][:200]})") from None
            if index._faiss.ntotal != len(embeddings) or index._faiss.d != embeddings.shape[1]:
                raise DataError(
                    f"{path}: holds {index._faiss.ntotal} x {index._faiss.d} vectors, embeddings.npy "
                    f"{len(embeddings)} x {embeddings.shape[1]}; the folder's files come from different indexes"
                )
        return index


MAX_NAMES_BYTES = 1 << 30  # names.json of a very large gallery: bounded, but large


def _faiss_index(embeddings: np.ndarray):
    faiss = import_faiss("backend 'faiss'")
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def _faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's top ``k`` in exact search's order: equal scores keep the earlier gallery row.

    FAISS returns equal scores in no set order and may keep a later row tied with the ``k``-th result in place of
    an earlier one. So it is asked for one more result than wanted (doubling for the rare query whose last result
    still ties with its ``k``-th: then every row of that score is among them), and the results are ordered by
    (score descending, row ascending)."""
    if not k or not len(queries):
        return index.search(queries, k)
    n = index.ntotal
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    todo, wanted = np.arange(len(queries)), min(k + 1, n)
    while len(todo):
        found_scores, found = index.search(queries[todo], wanted)
        done = (found_scores[:, -1] < found_scores[:, k - 1]) | (wanted == n)
        order = np.lexsort((found[done], -found_scores[done]), axis=1)[:, :k]  # by score, then row
        scores[todo[done]] = np.take_along_axis(found_scores[done], order, 1)
        indices[todo[done]] = np.take_along_axis(found[done], order, 1)
        todo, wanted = todo[~done], min(2 * wanted, n)
    return scores, indices
