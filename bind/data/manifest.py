"""Explicit pairing for your own data: a CSV or JSONL manifest, one row per paired sample.

Each modality is a column. File paths are relative to the manifest's folder; a ``text`` column
holds the text itself. Optional columns: ``label`` (a class, for label-aware losses and
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
from pathlib import Path
from typing import Any

from ..errors import DataError
from . import Items, register_dataset


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


@register_dataset("manifest")
def manifest(root: Path, split: str, path: str, column: str, kind: str | None = None) -> Items:
    """One column of a manifest; ``kind`` is "path" (default) or "text" (default for a column named text)."""
    file = Path(path) if Path(path).is_absolute() else root / path
    rows = read_manifest(file)
    if rows and column not in rows[0]:
        raise DataError(f"manifest {file}: no column {column!r}; columns are {', '.join(rows[0])}")
    kind = kind or ("text" if column == "text" else "path")
    if kind not in ("path", "text"):
        raise DataError(f"manifest {file}: kind must be 'path' or 'text', got {kind!r}")
    rows = [r for r in rows if r.get("split", split) in (split, "", None)]
    items = []
    for n, row in enumerate(rows):
        value = row[column]
        if value in (None, ""):
            raise DataError(f"manifest {file}: row {n + 1} has an empty {column!r}")
        if kind == "path":
            value = str((file.parent / value).resolve())
        items.append(value)
    labels = _labels(rows, file)
    return Items(items, labels, [str(r[column]) for r in rows])


def _labels(rows: list[dict[str, Any]], file: Path) -> list[int]:
    """The ``label`` column mapped to integers in order of appearance, else each row its own class."""
    if not rows or "label" not in rows[0]:
        return list(range(len(rows)))
    ids: dict[str, int] = {}
    return [ids.setdefault(str(r["label"]), len(ids)) for r in rows]


manifest.required_paths = lambda path, **_: [path]
