"""An approximate nearest-neighbour index over unit-norm embeddings (FAISS ``index_factory``), for galleries where
exact search is too slow.

The index kind is chosen by size as autofaiss chooses it, kept memory-mappable (see :func:`choose_factory`):
``Flat`` below 1,000 rows, ``IVF{c},Flat`` below 200k (``c`` the power of two nearest ``4 sqrt(N)``), and from there
``IVF{c},SQ8`` (``c`` near ``8 sqrt(N)``; an HNSW coarse quantizer from 16,384 cells), whose few extra candidates
are re-scored exactly from the embeddings. The search parameter (``nprobe``, ``efSearch``) is tuned at build time,
as autofaiss tunes it, to the smallest value whose recall@10 against exact search reaches a target, on gallery
rows held out of the index while it is tuned (queries not in the gallery; leave-one-out for a graph index).

``build_ann(X.npy)`` writes ``X.index`` (the FAISS index) and ``X.index.json`` (factory, tuned parameters,
measured recall, and the row count, width and size of the embeddings it was built from) beside the embeddings;
:func:`load_ann` refuses an index built from other embeddings and memory-maps the inverted lists
(``IO_FLAG_MMAP``). An index file is parsed by FAISS's C++ reader, which is not hardened against hostile files:
load only indexes you built or trust.

Example::

    embeddings = load_embeddings("gallery.npy")                   # bind.retrieval
    build_ann("gallery.npy", embeddings)                          # gallery.index + gallery.index.json
    scores, rows = load_ann("gallery.npy", embeddings).search(queries, k=10, embeddings=embeddings)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

FLAT_BELOW = 1_000  # autofaiss's flat_threshold: a flat scan of fewer rows is as fast as any index
QUANTIZE_FROM = 200_000  # from here on the codes are 8-bit (SQ8): a quarter of Flat's bytes to scan per probe
HNSW_QUANTIZER_FROM = 16_384  # cells: from here on the coarse quantizer is an HNSW graph, not a flat scan
TRAIN_POINTS_PER_CLUSTER = 40  # FAISS warns below 39 per centroid; autofaiss trains on 30 to 256
MAX_TRAIN_ROWS = 1 << 20  # the bounded training sample, whatever the gallery size
TUNING_QUERIES = 1000  # leave-one-out queries for tuning the search parameter
RESCORE_FACTOR = 8  # PQ indexes: candidates re-scored exactly per result wanted
RESCORE_SQ = 2  # SQ8 ranks almost as exact search does: a few candidates more fix the order and the scores
FORMAT = "bindkit-ann"
VERSION = 1


def import_faiss(what: str = "an approximate index"):
    """FAISS, or one line saying that ``what`` needs it and how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ConfigError(f"{what} needs faiss-cpu: pip install 'bindkit[faiss]'") from err
    return faiss


def index_path(npy: str | os.PathLike[str]) -> Path:
    """``X.npy`` -> ``X.index``: where an index of those embeddings lives."""
    return Path(npy).with_suffix(".index")


def meta_path(index: str | os.PathLike[str]) -> Path:
    return Path(f"{index}.json")


def clusters_for(rows: int, per_sqrt: int = 4) -> int:
    """The power of two nearest ``per_sqrt * sqrt(rows)`` (FAISS's guideline is 4 to 16 sqrt(N); autofaiss takes
    4 below 1M rows); at least 1, and few enough to train each centroid on 40 rows of the bounded sample."""
    clusters = 2 ** round(math.log2(per_sqrt * math.sqrt(max(rows, 1))))
    trainable = max(1, min(rows, MAX_TRAIN_ROWS) // TRAIN_POINTS_PER_CLUSTER)
    return min(clusters, 2 ** int(math.log2(trainable)))


def choose_factory(rows: int, dim: int) -> str:
    """The FAISS factory string for ``rows`` embeddings of width ``dim`` (inner product), by size as autofaiss
    chooses, kept memory-mappable (no HNSW over the rows themselves).

    Bytes per vector in the index (each IVF entry also keeps an 8-byte row id):

    * ``Flat`` (rows < 1,000): ``4 dim``; search is exact.
    * ``IVF{c},Flat`` (< 200k; ``c`` near ``4 sqrt(N)``): ``4 dim + 8`` (1,032 at 256-d): the rows copied into
      cells.
    * ``IVF{c},SQ8`` (from 200k; ``c`` near ``8 sqrt(N)``, at most 16,384 so 40 rows of the 1M-row sample train
      each): ``dim + 8`` (264 at 256-d): one byte a dimension, a quarter of the bytes to scan per probe, ranking
      almost as exactly (the few candidates more that are re-scored from the embeddings fix the order). Measured
      on 1M x 256 clustered rows: ``IVF4096,Flat`` reached recall@10 0.97 at 3.8x exact search's speed,
      ``IVF8192,SQ8`` 0.98 at 11x (docs/benchmarks.md). From 16,384 cells the coarse quantizer is an HNSW graph.
    """
    if rows < FLAT_BELOW:
        return "Flat"
    if rows < QUANTIZE_FROM:
        return f"IVF{clusters_for(rows)},Flat"
    clusters = clusters_for(rows, per_sqrt=8)
    quantizer = "_HNSW32" if clusters >= HNSW_QUANTIZER_FROM else ""
    return f"IVF{clusters}{quantizer},SQ8"


@dataclasses.dataclass
class AnnIndex:
    """A FAISS index with the search parameters tuned for it.

    ``rescore``: candidates per wanted result re-scored exactly from the embeddings (0: the index's own scores)."""

    index: Any  # faiss.Index
    factory: str
    params: dict[str, int]
    rescore: int = 0
    recall_at_10: float | None = None
    target_recall: float | None = None
    build_seconds: float | None = None
    path: Path | None = None

    def set_params(self, params: dict[str, int]) -> None:
        faiss = import_faiss()
        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)
        self.params = dict(params)

    def search(self, queries: np.ndarray, k: int, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The approximate top ``k`` rows by inner product: ``(scores (Q, k), rows (Q, k))``, best first, equal
        scores by row as exact search orders them; fewer found than ``k`` leaves ``-1`` rows scored ``-inf``."""
        k = min(k, self.index.ntotal)
        wanted = min(k * self.rescore, self.index.ntotal) if self.rescore else k
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), wanted)
        if self.rescore:
            scores = rescore(queries, rows, embeddings)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def rescore(queries: np.ndarray, rows: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """The exact inner products of each query with its candidate ``rows`` (``-1``: none), read from
    ``embeddings`` (a memory-mapped ``.npy``: only the candidates' rows are read, in file order)."""
    flat = rows.ravel()
    wanted = np.unique(flat[flat >= 0])
    vectors = np.asarray(embeddings[wanted], dtype=np.float32)  # sorted rows: sequential reads from the map
    where = np.searchsorted(wanted, np.maximum(flat, 0)).clip(max=max(len(wanted) - 1, 0))
    candidates = vectors[where].reshape(*rows.shape, -1)  # (Q, C, D)
    return np.einsum("qcd,qd->qc", candidates, np.asarray(queries, dtype=np.float32))


def _search_param(factory: str) -> str | None:
    """The parameter that trades speed for recall: ``nprobe`` for IVF, ``efSearch`` for HNSW, none for Flat."""
    if "IVF" in factory:
        return "nprobe"
    if factory.startswith("HNSW") or ",HNSW" in factory:
        return "efSearch"
    return None


def _param_values(factory: str, index: Any) -> list[int]:
    name = _search_param(factory)
    if name == "nprobe":  # up to every cell of a small index; a sixteenth of a large one's (beyond, exact search wins)
        clusters = import_faiss().extract_index_ivf(index).nlist
        cap = clusters if clusters <= 1024 else clusters // 16
        return sorted({min(2**i, cap) for i in range(0, max(1, cap.bit_length()) + 1)})
    if name == "efSearch":
        return [2**i for i in range(4, 13)]
    return []


def _params_for(factory: str, value: int) -> dict[str, int]:
    params = {_search_param(factory): value}
    if "_HNSW" in factory:  # the coarse quantizer's graph must look at least as wide as the cells probed
        params["quantizer_efSearch"] = max(2 * value, 16)
    return params


def top_rows(queries: np.ndarray, embeddings: np.ndarray, k: int, block: int = 16384) -> np.ndarray:
    """Each query's exact top ``k`` rows by inner product, a block of rows at a time (a plain reference; this
    module does not import :mod:`bind.retrieval`, which imports it)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), block):
        scores = queries @ np.asarray(embeddings[start : start + block], dtype=np.float32).T
        rows = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.indices(scores.shape)[1]
        scores = np.concatenate([best_scores, np.take_along_axis(scores, rows, 1)], axis=1)
        rows = np.concatenate([best_rows, rows + start], axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]  # by score, then row: as exact search orders them
        best_scores, best_rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    return best_rows


def _top_excluding(rows: np.ndarray, excluded: np.ndarray, k: int) -> list[np.ndarray]:
    """Each query's first ``k`` rows that are not in ``excluded`` (sorted), nor ``-1``."""
    keep = ~np.isin(rows, excluded) & (rows >= 0)
    return [row[mask][:k] for row, mask in zip(rows, keep, strict=True)]


def recall_of(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / max(1, sum(len(t) for t in truth))


def tune(ann: AnnIndex, embeddings: np.ndarray, held_out: np.ndarray, target: float) -> None:
    """Set the smallest search parameter whose recall@10 against exact search reaches ``target`` (the largest
    tried when none does; ``ann.recall_at_10`` says what was reached), for the ``held_out`` rows as queries.

    An IVF index is tuned before the held-out rows are added, so they are queries not in the gallery; any other
    index holds them already, and each one's own row is left out of both result lists (leave-one-out: a little
    optimistic for a graph index, whose edges lead a query to its own node's neighbours)."""
    k = min(10, len(embeddings) - 1)
    ann.target_recall = target
    if k < 1 or not len(held_out):
        ann.recall_at_10 = 1.0
        return
    queries = np.asarray(embeddings[held_out], dtype=np.float32)
    extra = min(len(held_out), 32)  # held-out rows among a query's neighbours are skipped: a few more than k
    exact = top_rows(queries, embeddings, k + extra)
    truth = _top_excluding(exact, held_out, k)

    def measure(params: dict[str, int] | None) -> float:
        if params:
            ann.set_params(params)
        _, found = ann.search(queries, k + extra, embeddings)
        return recall_of(_top_excluding(found, held_out, k), truth)

    values = _param_values(ann.factory, ann.index)
    if not values:
        ann.recall_at_10 = measure(None)
        return
    low, chosen, recall = 0, None, 0.0
    for value in values:  # doubling, then bisection between the last value short of the target and the first past it
        recall = measure(_params_for(ann.factory, value))
        if recall >= target:
            chosen = value
            break
        low = value
    if chosen is None:
        chosen = values[-1]
    else:
        high, best = chosen, recall
        while high - low > 1:
            middle = (low + high) // 2
            middle_recall = measure(_params_for(ann.factory, middle))
            if middle_recall >= target:
                high, best = middle, middle_recall
            else:
                low = middle
        chosen, recall = high, best
    ann.set_params(_params_for(ann.factory, chosen))
    ann.recall_at_10 = recall


def build_index(embeddings: np.ndarray, factory: str = "auto", target_recall: float = 0.95, seed: int = 0) -> AnnIndex:
    """Build and tune an index over ``embeddings`` (``(N, D)`` unit-norm float rows) in memory.

    ``factory``: ``"auto"`` (:func:`choose_factory`) or any FAISS factory string (e.g. ``"HNSW32"``,
    ``"IVF1024,PQ32"``); a PQ index's candidates are re-scored exactly."""
    if not 0 < target_recall <= 1:
        raise ConfigError(f"recall: expected a target between 0 and 1, got {target_recall}")
    faiss = import_faiss()
    rows, dim = embeddings.shape
    if rows == 0:
        raise ConfigError("an approximate index needs at least one embedding, got none")
    if factory == "auto":
        factory = choose_factory(rows, dim)
    start = time.perf_counter()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"factory {factory!r}: not a FAISS index_factory string ({_first_line(err)})") from None
    if not index.is_trained:
        clusters = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 256
        size = min(rows, MAX_TRAIN_ROWS, max(clusters * TRAIN_POINTS_PER_CLUSTER, 256 * TRAIN_POINTS_PER_CLUSTER))
        if rows < clusters:
            raise ConfigError(f"factory {factory!r}: {clusters} cells for {rows} embeddings; name fewer cells")
        sample = np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))
        index.train(np.asarray(embeddings[sample], dtype=np.float32))
    rescore_factor = (
        RESCORE_SQ if re.search(r"SQ8$", factory) else RESCORE_FACTOR if re.search(r"PQ|SQ|LSH|RQ|LSQ", factory) else 0
    )
    ann = AnnIndex(index, factory, {}, rescore_factor)
    rng = np.random.default_rng(seed + 1)
    held_out = np.sort(rng.choice(rows, min(TUNING_QUERIES, rows // 10), replace=False))
    if faiss.try_extract_index_ivf(index) is not None:  # rows carry their ids: add the held-out ones after tuning
        gallery = np.setdiff1d(np.arange(rows), held_out)
        _add(index, embeddings, gallery)
        tune(ann, embeddings, held_out, target_recall)
        _add(index, embeddings, held_out)
    else:
        _add(index, embeddings, None)
        tune(ann, embeddings, held_out, target_recall)
    ann.build_seconds = time.perf_counter() - start
    return ann


def _add(index: Any, embeddings: np.ndarray, rows: np.ndarray | None, block: int = 1 << 16) -> None:
    """Add ``rows`` of ``embeddings`` (all, in order, when None) a block at a time: a memory-mapped gallery is
    never read whole."""
    if rows is None:
        for start in range(0, len(embeddings), block):
            index.add(np.ascontiguousarray(embeddings[start : start + block], dtype=np.float32))
        return
    for start in range(0, len(rows), block):
        ids = rows[start : start + block]
        index.add_with_ids(np.ascontiguousarray(embeddings[ids], dtype=np.float32), ids.astype(np.int64))


def index_bytes(ann: AnnIndex) -> int:
    """The size of the index as written, counted without holding a copy."""
    faiss = import_faiss()
    total = 0

    def count(data: bytes) -> int:
        nonlocal total
        total += len(data)
        return len(data)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(ann.index, writer)
    del writer
    return total


def build_ann(
    npy: str | os.PathLike[str],
    embeddings: np.ndarray,
    factory: str = "auto",
    target_recall: float = 0.95,
    out: str | os.PathLike[str] | None = None,
) -> tuple[AnnIndex, dict[str, Any]]:
    """Build, tune and save an index of the embeddings in ``npy``: ``out`` (default ``X.index`` beside ``X.npy``)
    and ``out.json``, written together (:func:`bind.safe_io.atomic_outputs`). ``embeddings``: ``npy``'s, read by
    :func:`bind.retrieval.load_embeddings`. Returns the index and its JSON."""
    from .safe_io import atomic_outputs

    npy = Path(npy)
    ann = build_index(embeddings, factory, target_recall)
    out = Path(out) if out is not None else index_path(npy)
    faiss = import_faiss()
    with atomic_outputs([out, meta_path(out)]) as (index_file, json_file):
        writer = faiss.PyCallbackIOWriter(index_file.write)
        faiss.write_index(ann.index, writer)
        del writer
        index_file.flush()
        size = os.fstat(index_file.fileno()).st_size
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "factory": ann.factory,
            "params": ann.params,
            "rescore": ann.rescore,
            "recall_at_10": ann.recall_at_10,
            "target_recall": ann.target_recall,
            "build_seconds": round(ann.build_seconds or 0.0, 3),
            "index_bytes": size,
            "bytes_per_vector": size / len(embeddings),
            "embeddings": _fingerprint(npy, embeddings),
        }
        json_file.write(json.dumps(meta, indent=1).encode())
    ann.path = out
    return ann, meta


def _fingerprint(npy: Path, embeddings: np.ndarray) -> dict[str, Any]:
    return {
        "file": npy.name,
        "rows": int(embeddings.shape[0]),
        "width": int(embeddings.shape[1]),
        "bytes": npy.stat().st_size,
    }


def load_ann(
    npy: str | os.PathLike[str], embeddings: np.ndarray, index: str | os.PathLike[str] | None = None
) -> AnnIndex:
    """The index of ``npy``'s ``embeddings`` at ``index`` (default ``X.index`` beside it), memory-mapped.

    An index or JSON that is missing, damaged, or built from other embeddings is one :class:`DataError` naming
    the file. The index file is parsed by FAISS's C++ reader: load only indexes you built or trust."""
    from .safe_io import read_json

    npy = Path(npy)
    path = Path(index) if index is not None else index_path(npy)
    meta_file = meta_path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; build it with `bindkit index {npy}`")
    meta = read_json(meta_file, f"the description of {path.name} (written by `bindkit index`)")
    if not (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and isinstance(meta.get("factory"), str)
        and isinstance(meta.get("params"), dict)
        and all(isinstance(k, str) and isinstance(v, int) for k, v in meta["params"].items())
        and isinstance(meta.get("rescore"), int)
        and isinstance(meta.get("embeddings"), dict)
    ):
        raise DataError(f"{meta_file}: not an index description written by `bindkit index`; build it again")
    if meta.get("version") != VERSION:
        raise DataError(f"{meta_file}: index format version {meta.get('version')!r}; this bindkit reads {VERSION}")
    built_from, now = meta["embeddings"], _fingerprint(npy, embeddings)
    if any(built_from.get(key) != now[key] for key in ("rows", "width", "bytes")):
        raise DataError(
            f"{path}: built from embeddings of {built_from.get('rows')} x {built_from.get('width')} "
            f"({built_from.get('bytes')} bytes, {built_from.get('file')}), but {npy} holds {now['rows']} x "
            f"{now['width']} ({now['bytes']} bytes); build it again with `bindkit index {npy}`"
        )
    faiss = import_faiss()
    try:
        found = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as err:  # FAISS reports a damaged or foreign file as a RuntimeError of its own
        raise DataError(f"{path}: not a readable FAISS index ({_first_line(err)}); build it again") from None
    if found.ntotal != now["rows"] or found.d != now["width"]:
        raise DataError(
            f"{path}: holds {found.ntotal} x {found.d} vectors, {npy} {now['rows']} x {now['width']}; build it again"
        )
    ann = AnnIndex(found, meta["factory"], {}, meta["rescore"], meta.get("recall_at_10"), meta.get("target_recall"))
    ann.path = path
    try:
        ann.set_params(meta["params"])
    except RuntimeError as err:
        raise DataError(
            f"{meta_file}: search parameters {meta['params']} do not fit the index ({_first_line(err)})"
        ) from None
    return ann


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]
