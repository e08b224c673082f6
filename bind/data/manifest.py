"""Explicit pairing for your own data: a CSV or JSONL manifest, one row per paired sample.

Each modality is a column. File paths are relative to the manifest's folder; a column none of whose
cells names a file holds the text itself (:func:`column_holds_text`; ``kind`` in a recipe's ``args``
says it outright). Optional columns: ``label`` (a class, for label-aware losses and
class-match evaluation) and ``split`` (rows whose split differs from the requested one are
skipped). Example ``pairs.csv``::

    image,audio,text,split
    img/001.png,wav/001.wav,a dog barking,train
    img/002.png,wav/002.wav,rain on a roof,eval

In a recipe: ``train_data: {source: manifest, args: {path: pairs.csv, column: audio}}`` for each
modality, and ``pairing: row`` in the bind stage so row i of one column pairs with row i of another.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import Items, register_dataset

RESERVED_COLUMNS = ("id", "label", "split")  # manifest columns that are not modalities


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.jsonl`` manifest as dicts."""
    if not path.is_file():
        raise DataError(f"manifest {path} not found")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not a JSON object ({err.msg})") from err
        return rows
    raise DataError(f"manifest {path}: expected a .csv or .jsonl file")


def _split_rows(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` (``*``: every row); a row without a split belongs to every split."""
    return [r for r in rows if split == "*" or r.get("split", split) in (split, "", None)]


@register_dataset("manifest")
def manifest(root: Path, split: str, path: str, column: str, kind: str | None = None) -> Items:
    """One column of a manifest; ``kind`` is "path" or "text" (default: text when no cell names a file).

    ``split`` selects rows by the ``split`` column (``*``: all rows). Labels are numbered from the
    classes of the whole file, every split included, so train and eval agree on what label 3 means.
    """
    file = Path(path) if Path(path).is_absolute() else root / path
    all_rows = read_manifest(file)
    if all_rows and column not in all_rows[0]:
        raise DataError(f"manifest {file}: no column {column!r}; columns are {', '.join(all_rows[0])}")
    if kind not in (None, "path", "text"):
        raise DataError(f"manifest {file}: kind must be 'path' or 'text', got {kind!r}")
    rows = _split_rows(all_rows, split)
    kind = kind or ("text" if column_holds_text(file.parent, all_rows, column) else "path")
    if all_rows and not rows:
        splits = sorted({str(r.get("split")) for r in all_rows if r.get("split") not in ("", None)})
        raise DataError(
            f"manifest {file}: no rows of split {split!r}; its splits are {', '.join(splits)} (or '*': all)"
        )
    items = []
    for n, row in enumerate(rows):
        value = row[column]
        if value in (None, ""):
            raise DataError(f"manifest {file}: row {n + 1} has an empty {column!r}")
        if kind == "path":
            value = str((file.parent / value).resolve())
        items.append(value)
    class_names = manifest_classes(all_rows)
    return Items(items, labels_of(rows, class_names), [str(r[column]) for r in rows], class_names)


def column_holds_text(base: Path, rows: list[dict[str, Any]], column: str) -> bool:
    """Whether a column holds text rather than paths: none of its cells names a file under ``base``.

    A column with a single file among its cells is a path column, so a missing file there is an error
    (or a bad item), never quietly read as a caption."""
    return not any(_names_file(base, row.get(column)) for row in rows)


def _names_file(base: Path, value: Any) -> bool:
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        return (base / value).is_file()
    except (OSError, ValueError):  # a caption longer than a file name may be
        return False


def manifest_classes(rows: list[dict[str, Any]]) -> list[str] | None:
    """The ``label`` column's classes over all rows, in a fixed order: numerically if every label is an
    integer, else alphabetically. ``None`` when there is no label column."""
    if not rows or "label" not in rows[0]:
        return None
    names = {str(r["label"]).strip() for r in rows}
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def labels_of(rows: list[dict[str, Any]], class_names: list[str] | None) -> list[int]:
    """Each row's class index in ``class_names``; without labels each row is its own class."""
    if class_names is None:
        return list(range(len(rows)))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[str(r["label"]).strip()] for r in rows]


def _check_manifest(root: Path, split: str, path: str, column: str, kind: str | None = None) -> None:
    """What ``bindkit validate`` checks without reading the files: the manifest reads, has the column and the split."""
    manifest(root, split, path, column, kind)


manifest.required_paths = lambda path, **_: [path]
manifest.check = _check_manifest
