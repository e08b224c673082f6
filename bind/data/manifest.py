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
import re
from pathlib import Path
from typing import IO, Any

from ..errors import DataError
from ..safe_io import MAX_FIELD_BYTES, parse_json, text_lines
from .datasets import Items, register_dataset

RESERVED_COLUMNS = ("id", "label", "split")  # manifest columns that are not modalities


OPTIONAL_COLUMNS = ("id", "split")  # columns a JSONL row may leave out (a row without a split is in every split)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.jsonl`` manifest as dicts of text (``None``: a JSON null), read as a stranger's
    file: see :func:`read_manifest_lines`."""
    return read_manifest_lines(path)[0]


def read_manifest_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a manifest and the line of the file each ends on.

    Every refusal is one :class:`DataError` naming the file and the line (and column): a line that is not
    UTF-8 or is longer than 1 MiB, a CSV field over 1 MiB or unreadable quoting, a CSV row with more or fewer
    fields than its header, a header with an empty or repeated name, a JSONL line that is not one JSON object
    whose values are text, numbers or null, a row without a column another row has (``id`` and ``split`` may
    be left out), a NUL character, an empty ``label``. Nothing is read whole: a file without line breaks
    stops at its first MiB."""
    if not path.is_file():
        raise DataError(f"manifest {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise DataError(f"manifest {path}: expected a .csv or .jsonl file")
    with open(path, "rb") as f:
        rows, lines = _csv_rows(f, path) if suffix == ".csv" else _jsonl_rows(f, path)
    _check_rows(rows, lines, path)
    return rows, lines


def _csv_rows(f: IO[bytes], path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    reader = csv.reader(text_lines(f, path))
    limit = csv.field_size_limit(MAX_FIELD_BYTES)  # process-wide: set for this read only
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        names = [name.strip() for name in header]
        for i, name in enumerate(names):
            if not name or names.index(name) != i:
                what = "an empty column name" if not name else f"column {name!r} twice"
                raise DataError(f"{path}: line 1: the header has {what}; each column needs its own name")
        rows, lines = [], []
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(names):
                raise DataError(
                    f"{path}: line {reader.line_num}: {len(fields)} fields, the header names {len(names)} "
                    f"columns ({', '.join(names)}); quote a field that holds a comma"
                )
            rows.append(dict(zip(names, fields, strict=True)))
            lines.append(reader.line_num)
        return rows, lines
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: not readable as CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _jsonl_rows(f: IO[bytes], path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    for number, line in enumerate(text_lines(f, path), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        row = parse_json(line.rstrip("\r\n"), where, "one JSON object per line (a row: column -> value)")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object (a row: column -> value), got {type(row).__name__}")
        rows.append({key: _cell(value, f"{where}: column {key!r}") for key, value in row.items()})
        lines.append(number)
    return rows, lines


def _cell(value: Any, where: str) -> str | None:
    """A JSONL value as a CSV cell would be: text (numbers written out), or None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise DataError(f"{where}: expected text, a number or null, got a {type(value).__name__}; a cell holds one value")


def _check_rows(rows: list[dict[str, Any]], lines: list[int], path: Path) -> None:
    columns: dict[str, int] = {}  # every column of the file -> the first line that has it
    for row, line in zip(rows, lines, strict=True):
        for column in row:
            columns.setdefault(column, line)
    for row, line in zip(rows, lines, strict=True):
        missing = [c for c in columns if c not in row and c not in OPTIONAL_COLUMNS]
        if missing:
            raise DataError(
                f"{path}: line {line}: no {missing[0]!r} (line {columns[missing[0]]} has that column); every row "
                f"needs every column ({', '.join(c for c in columns if c not in OPTIONAL_COLUMNS)})"
            )
        for column, value in row.items():
            if value is not None and "\0" in value:
                raise DataError(f"{path}: line {line}: column {column!r} holds a NUL character")
        if "label" in columns and not (row["label"] or "").strip():
            raise DataError(f"{path}: line {line}: empty label; every row of a manifest with a label column needs one")


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
    all_rows, all_lines = read_manifest_lines(file)
    if all_rows and column not in all_rows[0]:
        raise DataError(f"manifest {file}: no column {column!r}; columns are {', '.join(all_rows[0])}")
    if kind not in (None, "path", "text"):
        raise DataError(f"manifest {file}: kind must be 'path' or 'text', got {kind!r}")
    rows = _split_rows(all_rows, split)
    line_of = {id(row): line for row, line in zip(all_rows, all_lines, strict=True)}
    kind = kind or ("text" if column_holds_text(file.parent, all_rows, column) else "path")
    if all_rows and not rows:
        splits = sorted({str(r.get("split")) for r in all_rows if r.get("split") not in ("", None)})
        raise DataError(
            f"manifest {file}: no rows of split {split!r}; its splits are {', '.join(splits)} (or '*': all)"
        )
    items = []
    for row in rows:
        value = row.get(column)  # an optional column (split, id) may be absent from a JSONL row
        if value in (None, ""):
            raise DataError(f"{file}: line {line_of[id(row)]}: empty {column!r}; every row needs a value there")
        if kind == "path":
            value = str((file.parent / value).resolve())
        items.append(value)
    class_names = manifest_classes(all_rows)
    return Items(items, labels_of(rows, class_names), [str(r.get(column)) for r in rows], class_names)


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
    if all(re.fullmatch(r"-?\d{1,18}", n) for n in names):  # longer digit strings sort as text
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
