"""Embedding a corpus: reading overlapped with the model, rows written as they come, resumable, split over processes.

:func:`bind.encoder.embed_batches` is the pipeline ``BindModel.encode`` and ``bindkit embed`` share: DataLoader
workers read and preprocess the next batches (each batch in one ``preprocess_many`` call) while the model runs on
the current one, so a tower waits on the disk only when reading is slower than the model.

:func:`embed_corpus` writes ``OUT.npy`` (float32, one unit row per item, in input order) and ``OUT.names.txt``
for any number of items with memory that does not grow with them:

- the items are cut into chunks of ``chunk_items`` (whole batches); texts are sorted longest first within a
  chunk, so a batch pads to about its own length;
- each finished chunk's rows are written at their place in ``OUT.npy.partial/rows.npy`` (a preallocated ``.npy``
  written with ``pwrite``, never held in memory or mapped) and then marked in ``done`` (one byte per chunk), after
  ``fdatasync``: a kill or a full disk at any instant loses at most the chunks in flight;
- ``meta.json`` there records the items (a SHA-256 of their names), the model (a fingerprint of its weights), the
  width and the chunk size; a rerun with the same ones resumes at the first unfinished chunk, and a rerun with
  other ones is refused in one line rather than overwriting rows that were already paid for;
- chunk ``c`` belongs to rank ``c % world_size``: any number of processes (``--nproc``, or ``torchrun`` on
  several machines sharing the folder) write disjoint rows of the same file, and the rows are the same, in the
  same order, as one process would write. Whoever finds every chunk done renames the finished pair over
  ``OUT.npy`` and ``OUT.names.txt`` as one unit (under a lock, so two finishing at once rename once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .encoder import batch_plan, embed_batches
from .errors import BindError, DataError
from .inputs import names_path
from .safe_io import not_written, read_json, replace_together, write_atomic

if TYPE_CHECKING:
    from .encoder import ModalityEncoder

CHUNK_ITEMS = 4096  # rows per chunk: what a kill can lose, and how finely texts are sorted by length
FORMAT = 1  # meta.json's layout


def embed_corpus(
    encoder: ModalityEncoder,
    items: Sequence[Any],
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    chunk_items: int | None = None,
    show_progress: bool = True,
) -> Path | None:
    """Embed ``items`` into ``out`` (a ``.npy``) and its names file, resuming what an earlier run left.

    ``names``: each item's line in the names file (default: the items themselves, which must then be strings).
    This process embeds the unfinished chunks of ``rank`` of ``world_size``. Returns ``out`` when this process
    finished the pair (every chunk was done), None when chunks of other ranks are still missing.
    """
    out = Path(out)
    names = [str(item) for item in items] if names is None else list(names)
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} items")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}")
    chunk_items = chunk_items or CHUNK_ITEMS
    chunk_items = max(batch_size, chunk_items // batch_size * batch_size)  # whole batches
    partial = Partial(out, len(items), encoder.embed_dim, chunk_items)
    try:
        return _embed_into(partial, encoder, items, names, batch_size, workers, rank, world_size, show_progress)
    except OSError as err:  # a full disk, ulimit -f, no permission: one line, saying what is kept
        if isinstance(err, BindError):
            raise
        kept = (
            f"; the rows done so far are kept in {partial.folder}: run the same command again to resume"
            if partial.folder.is_dir()
            else ""
        )
        raise DataError(not_written([out, names_path(out)], err) + kept) from err


def _embed_into(
    partial: Partial,
    encoder: ModalityEncoder,
    items: Sequence[Any],
    names: list[str],
    batch_size: int,
    workers: int | None,
    rank: int,
    world_size: int,
    show_progress: bool,
) -> Path | None:
    partial.open(
        {
            "format": FORMAT,
            "rows": len(items),
            "dim": partial.width,
            "chunk_items": partial.chunk_items,
            "modality": encoder.modality,
            "items_sha256": names_digest(names),
            "model": fingerprint(encoder),
        }
    )
    done = partial.done()
    mine = [c for c in range(partial.chunks) if c % world_size == rank and not done[c]]
    plans = [batch_plan(encoder, items, *partial.rows_of(c), batch_size) for c in mine]
    flat = [batch for plan in plans for batch in plan]
    bar = tqdm(
        total=sum(len(b) for b in flat),
        desc=f"embed {encoder.modality}",
        unit="item",
        disable=not show_progress or len(flat) < 2,
    )
    batches = embed_batches(encoder, items, flat, workers)
    with bar, contextlib.closing(batches):
        for chunk, plan in zip(mine, plans, strict=True):
            start, stop = partial.rows_of(chunk)
            rows = np.empty((stop - start, partial.width), dtype=np.float32)
            for batch in plan:
                rows[np.asarray(batch) - start] = next(batches).numpy()
                bar.update(len(batch))
            partial.write_chunk(chunk, rows)
    return partial.finish(names)


def partial_folder(out: Path) -> Path:
    """``OUT.npy.partial``: where :func:`embed_corpus` keeps the rows of ``out`` until every chunk is done."""
    return out.with_name(out.name + ".partial")


class Partial:
    """``OUT.npy.partial/``: the rows being written (``rows.npy``), which chunks are done, and what they are of."""

    def __init__(self, out: Path, rows: int, width: int, chunk_items: int) -> None:
        self.out, self.rows, self.width, self.chunk_items = out, rows, width, chunk_items
        self.folder = partial_folder(out)
        self.chunks = -(-rows // chunk_items)
        self._header = _npy_header(rows, width)
        self.header_bytes = len(self._header)
        self.file_bytes = self.header_bytes + rows * width * 4  # rows.npy, whole

    def rows_of(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_items, min(self.rows, (chunk + 1) * self.chunk_items)

    def open(self, meta: dict[str, Any]) -> None:
        """Start the folder, or check that the one there is of the same items, model and layout."""
        if not self.folder.is_dir():
            self._create(meta)
        found = read_json(self.folder / "meta.json", "the record of a partial `bindkit embed`", 1 << 20)
        if found != meta:
            differ = sorted(k for k in meta if not isinstance(found, dict) or found.get(k) != meta[k])
            raise DataError(
                f"{self.folder}: a partial embedding of other {', '.join(differ) or 'inputs'} than this run's; "
                "rerun with the same inputs and model to finish it, or delete the folder to start over"
            )
        for name, size in (("rows.npy", self.file_bytes), ("done", self.chunks)):
            found_size = (self.folder / name).stat().st_size
            if found_size != size:
                raise DataError(
                    f"{self.folder / name}: {found_size} bytes, expected {size}; delete the folder to start over"
                )

    def _create(self, meta: dict[str, Any]) -> None:
        """Built in a hidden folder and renamed into place: a second process starting at the same moment finds
        either no folder or a whole one."""
        temp = self.folder.with_name(f".{self.folder.name}.{secrets.token_hex(4)}.tmp")
        temp.mkdir()
        try:
            with open(temp / "rows.npy", "wb") as f:
                f.write(self._header)
                f.truncate(self.file_bytes)  # sparse: blocks are taken as rows come
            with open(temp / "done", "wb") as f:
                f.write(bytes(self.chunks))
            write_atomic(temp / "meta.json", json.dumps(meta, indent=1).encode())
            try:
                os.rename(temp, self.folder)
            except OSError:
                if not self.folder.is_dir():  # not another process's folder: a real failure
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def done(self) -> bytes:
        return (self.folder / "done").read_bytes()

    def write_chunk(self, chunk: int, rows: np.ndarray) -> None:
        """The chunk's rows at their place, on disk, and only then its mark in ``done``: a failed write (a full
        disk) or a kill leaves the chunks marked before it, and a rerun resumes after them."""
        start, _ = self.rows_of(chunk)
        data = memoryview(np.ascontiguousarray(rows, dtype="<f4")).cast("B")
        _write_at(self.folder / "rows.npy", data, self.header_bytes + start * self.width * 4)
        _write_at(self.folder / "done", b"\1", chunk)

    def finish(self, names: Sequence[str]) -> Path | None:
        """Rename the finished rows and their names over ``OUT.npy`` and ``OUT.names.txt``, once, when every
        chunk is done; None while some are not (another rank's)."""
        try:
            held = open(self.folder / "lock", "a")  # noqa: SIM115  (closed below)
        except FileNotFoundError:  # another rank finished and removed the folder
            return self.out if self.out.is_file() else None
        with held:
            fcntl.flock(held, fcntl.LOCK_EX)  # two ranks finishing at once: one renames, the other finds it gone
            if not self.folder.is_dir():
                return self.out if self.out.is_file() else None
            if not all(self.done()):
                return None
            names_file = self.folder / "names.txt"
            with open(names_file, "wb") as f:
                for name in names:  # one per line: a line break inside an item becomes a space
                    f.write((name.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            replace_together([self.folder / "rows.npy", names_file], [self.out, names_path(self.out)])
            shutil.rmtree(self.folder, ignore_errors=True)
        return self.out


def _write_at(path: Path, data: bytes | memoryview, offset: int) -> None:
    """``data`` at ``offset`` of ``path``, on the disk (``fdatasync``) before this returns."""
    fd = os.open(path, os.O_WRONLY)
    try:
        data = memoryview(data)
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _npy_header(rows: int, width: int) -> bytes:
    """The header ``np.save`` writes for a (rows, width) little-endian float32 array."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
    return buffer.getvalue()


def names_digest(names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def fingerprint(encoder: ModalityEncoder) -> str:
    """A digest of the encoder's class, build arguments and a sample of every weight tensor: another model (or
    the same architecture with other weights) gives another digest, in a moment even for a large tower."""
    digest = hashlib.sha256(type(encoder).__qualname__.encode())
    digest.update(json.dumps(getattr(encoder, "build_args", {}), sort_keys=True, default=str).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        sample = tensor.detach().reshape(-1)[:: max(1, tensor.numel() // 64)][:64]
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()
