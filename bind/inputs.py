"""Files as people have them: folders read recursively, globs, each real folder visited once.

``BindModel.encode`` and every command taking INPUT arguments expand folders and globs here. A folder is
walked recursively in sorted order, hidden files and folders skipped; symbolic links to folders are followed,
but each real folder is read once, so a link back to a parent (a cycle) ends the walk instead of repeating
it forever. Globs (``photos/**/*.png``) are matched on that same walk, never by following links blindly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

GLOB_CHARS = frozenset("*?[")


def walk_files(folder: str | os.PathLike[str], suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Every file under ``folder`` (recursively, sorted; hidden ones skipped) whose suffix is in ``suffixes``
    (lower case, with the dot; None: any)."""
    return sorted(str(p) for p in _walk(Path(folder)) if suffixes is None or p.suffix.lower() in suffixes)


def _walk(top: Path) -> Iterator[Path]:
    """Files under ``top``, each real folder entered once (by device and inode), links to folders followed."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError:  # unreadable, or a dangling link: nothing to read there
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows links; the seen set stops cycles
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue


def is_glob(text: str) -> bool:
    return bool(GLOB_CHARS & set(text))


def glob_files(pattern: str) -> list[str]:
    """Files matching ``pattern`` (``*``, ``?``, ``[...]`` within a name; ``**`` any depth), sorted.

    The walk starts at the pattern's longest folder without wildcards and visits each real folder once."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if is_glob(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    rest = "/".join(parts[fixed:])
    if not rest:
        return [pattern] if Path(pattern).is_file() else []
    if not base.is_dir():
        return []
    matcher = re.compile(_glob_regex(rest))
    out = []
    for path in _walk(base):
        relative = path.relative_to(base).as_posix()
        if matcher.fullmatch(relative):
            out.append(str(path) if fixed else relative)
    return sorted(out)


def _glob_regex(pattern: str) -> str:
    """A regular expression for a relative glob: ``**/`` any folders (or none), ``*`` and ``?`` within a name."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def names_path(npy: str | os.PathLike[str]) -> Path:
    """``gallery.npy`` -> ``gallery.names.txt``: the item of each row of an embeddings file (``bindkit embed``)."""
    npy = Path(npy)
    return npy.with_name((npy.name[: -len(".npy")] if npy.name.endswith(".npy") else npy.name) + ".names.txt")
