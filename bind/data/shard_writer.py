"""``bindkit shard``: pack a manifest's rows into WebDataset tar shards and their ``index.json``.

The layout is described in :mod:`bind.data.shards`, which reads it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webdataset import TarWriter

from ..errors import DataError
from .manifest import RESERVED_COLUMNS, column_holds_text, labels_of, manifest_classes, read_manifest
from .shards import INDEX

log = logging.getLogger(__name__)

FIXED_MTIME = 0  # the same manifest gives byte-identical shards (an int: a float mtime adds a PAX header per member)


def write_shards(
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    split: str | None = None,
    text_columns: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Pack a manifest's rows into ``out_dir/shard-000000.tar ...`` and ``out_dir/index.json``.

    A sample's key is its row's 0-based position in the manifest (zero-padded), or its ``id``
    column. Each modality column is stored as the file's bytes under ``COLUMN.EXT`` (``EXT`` from
    the file name), a text column (``text_columns``; default: those none of whose cells names a file,
    :func:`~bind.data.manifest.column_holds_text`) as ``COLUMN.txt``, the label's class index as ``label.cls`` and,
    with ``split=None``, the row's split as ``split.txt``. ``split`` keeps the rows of one split (and
    rows without one), as the ``manifest`` dataset does. A new shard starts after
    ``samples_per_shard`` samples or before ``max_shard_bytes`` would be passed. The shards are
    written to a temporary folder that replaces ``out_dir`` (only with ``overwrite`` if it holds files)
    once complete.

    Example::

        write_shards("pairs.csv", "shards/train", split="train")  # [shards/train/shard-000000.tar, ...]
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise DataError(f"{out_dir} already exists and is not an empty folder; pass --overwrite to replace it")
    all_rows = read_manifest(manifest_path)
    rows = [(n, r) for n, r in enumerate(all_rows) if split is None or r.get("split", split) in (split, "", None)]
    if not rows:
        raise DataError(f"manifest {manifest_path}: no rows" + (f" of split {split!r}" if split else ""))
    columns = [c for c in all_rows[0] if c not in RESERVED_COLUMNS]
    for column in columns:
        if not column or "." in column or "/" in column:
            raise DataError(f"manifest {manifest_path}: column name {column!r} must be non-empty, without '.' or '/'")
    has_label, has_split = "label" in all_rows[0], "split" in all_rows[0] and split is None
    class_names = manifest_classes(all_rows)  # every split's classes: shards of train and eval agree
    labels = labels_of([r for _, r in rows], class_names)
    keys = _keys(rows, len(all_rows), manifest_path)
    if text_columns is None:
        text_columns = [c for c in columns if column_holds_text(manifest_path.parent, all_rows, c)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    written: list[dict[str, Any]] = []
    extensions: dict[str, set[str]] = {c: set() for c in columns}
    writer = None
    try:
        for (n, row), key, label in zip(rows, keys, labels, strict=True):
            sample = {"__key__": key}
            for column in columns:
                value = row.get(column)
                if value in (None, ""):
                    raise DataError(f"manifest {manifest_path}: row {n + 1} has an empty {column!r}")
                if column in text_columns:
                    ext, data = "txt", str(value).encode("utf-8")
                else:
                    file = manifest_path.parent / str(value)
                    if not file.is_file():
                        raise DataError(f"manifest {manifest_path}: row {n + 1} ({column}): file {file} not found")
                    ext, data = file.suffix[1:].lower() or "bin", file.read_bytes()
                extensions[column].add(ext)
                sample[f"{column}.{ext}"] = data
            if has_label:
                sample["label.cls"] = str(label).encode()
            if has_split and row.get("split"):
                sample["split.txt"] = str(row["split"]).encode()
            size = sum(512 + len(v) for k, v in sample.items() if k != "__key__")  # + tar headers
            full = written and (
                written[-1]["samples"] == samples_per_shard
                or (max_shard_bytes and written[-1]["bytes"] + size > max_shard_bytes)
            )
            if writer is None or full:
                if writer is not None:
                    writer.close()
                written.append({"file": f"shard-{len(written):06d}.tar", "samples": 0, "bytes": 0})
                writer = TarWriter(str(tmp / written[-1]["file"]), encoder=False, mtime=FIXED_MTIME)
            writer.write(sample)
            written[-1]["samples"] += 1
            written[-1]["bytes"] += size
        writer.close()
        for shard in written:
            shard["bytes"] = (tmp / shard["file"]).stat().st_size
        index = {
            "format": "webdataset",
            "written_by": "bindkit shard",
            "manifest": str(manifest_path),
            "split": split,
            "samples": len(rows),
            "columns": {c: sorted(e) for c, e in extensions.items()},
            "text_columns": [c for c in columns if c in text_columns],
            "class_names": class_names,
            "shards": written,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():  # replace: move the old folder aside first, so a failure leaves one of the two
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d samples in %d shards to %s", len(rows), len(written), out_dir)
    return [out_dir / s["file"] for s in written]


def _keys(rows: list[tuple[int, dict[str, Any]]], total: int, manifest_path: Path) -> list[str]:
    """Sample keys: the ``id`` column, else the row number zero-padded (WebDataset keys end at the first dot)."""
    if not rows or "id" not in rows[0][1]:
        width = max(6, len(str(total - 1)))
        return [f"{n:0{width}d}" for n, _ in rows]
    keys, seen = [], {}
    for n, row in rows:
        key = str(row.get("id") or "")
        if not key or "." in key or "/" in key:
            raise DataError(
                f"manifest {manifest_path}: row {n + 1} has id {key!r}; ids must be non-empty, no '.' or '/'"
            )
        if key in seen:
            raise DataError(f"manifest {manifest_path}: rows {seen[key] + 1} and {n + 1} have the same id {key!r}")
        seen[key] = n
        keys.append(key)
    return keys
