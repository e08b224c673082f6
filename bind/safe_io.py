"""The rules for files, written once: how bindkit reads what anyone may have written, and how it writes its outputs.

Reading (every reader of a stranger's file goes through these; each refusal is one line naming the file):

* :func:`read_limited`: at most ``limit`` bytes, refused past it (no file is read whole on trust);
* :func:`read_json` / :func:`parse_json`: bounded in size and nesting, UTF-8, no duplicate keys, no NaN;
* :func:`text_lines`: a manifest's lines, each bounded and decoded on its own (the line of a bad byte is named);
* :func:`read_member`: a tar member's bytes, refused when sparse or larger than :func:`max_member_bytes`, and
  read as at most that many bytes whatever its header says.

YAML recipes have their own reader with the same rules (:func:`bind.typed_yaml.read_recipe_file`).

Writing: :func:`atomic_output` (one file) and :func:`atomic_outputs` (files that belong together, such as a
gallery's ``.npy`` and its names) write into hidden temporary files beside the targets and rename them into
place only once every byte is on disk, so a write that fails partway (disk full, ``ulimit -f``, a kill) leaves
the previous outputs as they were; the error says so in one line.

Errors: :data:`BOUNDARY_ERRORS` are the library exceptions the CLI turns into one line (:func:`error_line`)
naming the file (the exception's own, else the one the innermost function on its way held), not a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import pickle
import secrets
import stat
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .errors import BindError, ConfigError, DataError

MAX_JSON_BYTES = 16 << 20  # config.json, index.json, eval.json: a few KB; a long class list a few hundred
MAX_JSON_DEPTH = 64  # bindkit's JSON nests about 5 levels; this bounds every recursive walk over what was read
MAX_LINE_BYTES = 1 << 20  # one manifest line (a row): a long caption fits, a file without line breaks does not
MAX_FIELD_BYTES = 1 << 20  # one CSV field: the same bound, for a quoted field spanning lines
MAX_MEMBER_BYTES = 512 << 20  # one tar member: a long video clip fits; $BINDKIT_MAX_MEMBER_BYTES overrides it


# ---- reading --------------------------------------------------------------------------------------------
def read_limited(path: Path, limit: int, what: str, error: type[Exception] = DataError) -> bytes:
    """The bytes of ``path``, or ``error`` naming it when it holds more than ``limit`` (``what``: what it should be)."""
    try:
        # non-blocking open: a FIFO put where a file should be would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{path}: not a regular file (a FIFO, device or folder); expected {what}")
            raw = read_at_most(f, limit + 1)
    except OSError as err:
        raise error(f"{path}: cannot read it ({err.strerror or err}); expected {what}") from None
    if len(raw) > limit:
        raise error(f"{path}: larger than {_size(limit)}; expected {what}")
    return raw


def read_json(
    path: Path, what: str, limit: int = MAX_JSON_BYTES, error: type[Exception] = DataError, allow_nan: bool = False
) -> Any:
    """The JSON document in ``path``, read by :func:`parse_json`'s rules; ``what`` says what the file should be."""
    return parse_json(read_limited(path, limit, what, error), str(path), what, error, allow_nan)


def parse_json(
    raw: bytes | str, where: str, what: str, error: type[Exception] = DataError, allow_nan: bool = False
) -> Any:
    """``raw`` as JSON: UTF-8, no duplicate keys, nested at most :data:`MAX_JSON_DEPTH` deep, and no NaN or
    Infinity unless ``allow_nan`` (files of figures, where Python's json writes them).

    Each refusal is one ``error`` starting with ``where`` (a file, or ``file: line N``)."""
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
        constant = float if allow_nan else _no_constant
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=constant)
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start}: {err.reason}); expected {what}") from None
    except json.JSONDecodeError as err:  # a one-line document (a JSONL row): its column says where
        at = f"line {err.lineno}, column {err.colno}" if "\n" in err.doc.rstrip() else f"column {err.colno}"
        raise error(f"{where}: not valid JSON ({at}: {err.msg}); expected {what}") from None
    except _Refused as err:
        raise error(f"{where}: {err}; expected {what}") from None
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; expected {what}") from None
    except ValueError as err:  # an integer of more digits than Python converts (4300)
        raise error(f"{where}: {err}; expected {what}") from None
    if nesting_depth(data) > MAX_JSON_DEPTH:
        raise error(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; expected {what}")
    return data


class _Refused(ValueError):
    """What :func:`parse_json`'s hooks refuse; the caller names the file."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # which of the two would win is a guess; a file bindkit wrote never has both
            raise _Refused(f"duplicate key {key[:60]!r} in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def nesting_depth(data: Any) -> int:
    """How deep lists and mappings nest in ``data`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:  # deep enough to refuse: no need to walk the rest
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def text_lines(f: IO[bytes], path: Path, limit: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines of a binary file as text (line endings kept, a leading BOM dropped), each decoded on its own.

    A line longer than ``limit`` bytes, or one that is not UTF-8, is a :class:`DataError` naming the line, so a
    file without line breaks never lands in memory whole."""
    for number in itertools.count(1):
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit:
            raise DataError(f"{path}: line {number} is longer than {_size(limit)}; expected one row per line")
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: line {number}: not UTF-8 text (byte {err.start + 1} of the line: {err.reason}); "
                "save the file as UTF-8"
            ) from None


def positive_env(name: str, default: int, unit: str) -> int:
    """A limit a user may raise: ``$NAME`` when set (a positive whole number of ``unit``), else ``default``."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"${name}: expected a positive number of {unit}, got {value!r}")
    return limit


def max_member_bytes() -> int:
    """The largest tar member read: ``$BINDKIT_MAX_MEMBER_BYTES`` when set, else :data:`MAX_MEMBER_BYTES`."""
    return positive_env("BINDKIT_MAX_MEMBER_BYTES", MAX_MEMBER_BYTES, "bytes")


def member_problem(member: tarfile.TarInfo, limit: int) -> str | None:
    """Why a tar member's header is refused before its bytes are read (``None``: it is not).

    A sparse member expands to its declared size in memory, however few bytes the tar holds."""
    if member.issparse():
        return f"{member.name}: a sparse tar member (shards hold plain files)"
    if member.size > limit:
        return f"{member.name}: {_size(member.size)}, over the {_size(limit)} a member may have ($BINDKIT_MAX_MEMBER_BYTES)"
    return None


def read_member(f: IO[bytes] | None, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a member's file object; :class:`ValueError` when it holds more (a lying header)."""
    if f is None:
        raise ValueError(f"{name}: not a regular file member")
    data = read_at_most(f, limit + 1)
    if len(data) > limit:
        raise ValueError(f"{name}: more than the {_size(limit)} a member may have")
    return data


def read_at_most(f: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, a MiB at a time: ``f.read(n)`` sets aside ``n`` bytes before reading any,
    however few the file holds."""
    chunks, total = [], 0
    while total < n and (chunk := f.read(min(_CHUNK, n - total))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


_CHUNK = 1 << 20


def _size(n: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


# ---- writing --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; ``path`` is replaced only when the block ends normally.

    Example::

        with atomic_output("runs/seeds.json") as f:
            f.write(data)
    """
    with atomic_outputs([path]) as (f,):
        yield f


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[IO[bytes]]]:
    """One binary file per path; every path is replaced when the block ends normally, none when it fails.

    The content goes to hidden temporary files in each target's folder (``.NAME.RANDOM.tmp``), is flushed and
    fsynced, and only then renamed over the targets, in the order given; if a rename fails, those already done
    are undone from hard links to the previous files. A failure while writing (``OSError``: disk full, ``ulimit
    -f``, no permission) removes the temporary files and is a one-line :class:`DataError` saying the previous
    files are unchanged; any other exception is re-raised after the same clean-up. A crash between two renames
    (microseconds apart) is the one way to leave new and old files side by side.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    files: list[IO[bytes]] = []
    try:
        for target in targets:
            temp = _create_temp(target)
            temps.append(temp)
            files.append(open(temp, "wb"))  # noqa: SIM115 (closed below, on every path)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        _replace_all(temps, targets)
    except OSError as err:
        if isinstance(err, BindError):  # the block's own one-line error (a DataError is an OSError)
            raise
        raise DataError(_write_failed(targets, err)) from err
    finally:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)


def not_written(targets: Sequence[Path], err: OSError) -> str:
    """The one line for outputs a failed write left as they were: ``A: not written, nor B: WHY; the previous ...``."""
    return _write_failed(list(targets), err)


def replace_together(sources: Sequence[Path], targets: Sequence[Path]) -> None:
    """Rename finished files (each beside its target, fsynced by whoever wrote it) over ``targets`` as one unit:
    :func:`atomic_outputs`' renames, for files too large to write in one block. A failure puts back the files
    already replaced and is one :class:`DataError` line."""
    try:
        _replace_all(list(sources), list(targets))
    except OSError as err:
        raise DataError(_write_failed(list(targets), err)) from err


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a failure leaves either the old or the new file, never half of one."""
    with atomic_output(path) as f:
        f.write(data)


def _create_temp(target: Path) -> Path:
    """An empty hidden file beside ``target``, created with the permissions a new ``target`` would get."""
    while True:
        temp = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue
        except OSError as err:  # a missing folder, no permission: name the target, not the temporary file
            err.filename = str(target)
            raise


def _replace_all(temps: list[Path], targets: list[Path]) -> None:
    """Rename each temp over its target; on a failure, put back what was already replaced."""
    backups: list[Path | None] = []
    done = 0
    try:
        for target in targets:
            backups.append(_link_backup(target) if len(targets) > 1 else None)
        for temp, target in zip(temps, targets, strict=True):
            try:
                os.replace(temp, target)
            except OSError as err:
                err.filename = str(target)
                raise
            done += 1
    except OSError:
        for target, backup in list(zip(targets, backups, strict=False))[:done]:
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink()
        raise
    finally:
        for backup in backups:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink(missing_ok=True)


def _link_backup(target: Path) -> Path | None:
    """A hard link to ``target``'s current file (no data copied), or None when there is none or links fail."""
    if not target.is_file():
        return None
    backup = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.old")
    try:
        os.link(target, backup)
    except OSError:
        return None
    return backup


def _write_failed(targets: list[Path], err: OSError) -> str:
    what = err.strerror or str(err) or type(err).__name__
    code = f" (errno {err.errno})" if err.errno else ""
    also = f", nor {', '.join(map(str, targets[1:]))}" if len(targets) > 1 else ""
    existing = [t.name for t in targets if t.is_file()]
    if not existing:
        kept = "nothing was written"
    else:
        kept = f"the previous {' and '.join(existing)} {'is' if len(existing) == 1 else 'are'} unchanged"
    return f"{targets[0]}: not written{also}: {what}{code}; {kept}"


# ---- the error boundary ---------------------------------------------------------------------------------
def _safetensors_error() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover (a dependency of bindkit)
        return ()
    return (SafetensorError,)


# What reading or writing a file raises from inside a library: the CLI prints one line naming the file, not a
# traceback (bugs, any other exception type, still show theirs).
BOUNDARY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    UnicodeError,
    json.JSONDecodeError,
    csv.Error,
    pickle.UnpicklingError,
    tarfile.TarError,
    zipfile.BadZipFile,
    RecursionError,
    MemoryError,
    *_safetensors_error(),
)

_PATH_NAMES = ("path", "file", "filename", "out", "target", "tmp", "directory", "folder")


def error_line(err: BaseException) -> str:
    """One line for a library exception: the file it concerns (when it can be told) and what went wrong."""
    path = getattr(err, "filename", None) or _file_in_traceback(err)
    if isinstance(path, (str, bytes, os.PathLike)):
        return f"{os.fsdecode(path)}: {_what(err)}"
    return f"{_what(err)} (file unknown: --debug shows where)"


def _what(err: BaseException) -> str:
    name = type(err).__name__
    if isinstance(err, OSError):
        text = err.strerror or str(err) or name
        return f"{text} ({name}{f', errno {err.errno}' if err.errno else ''})"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.start}: {err.reason})"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
    if isinstance(err, RecursionError):
        return "nested too deeply to read (RecursionError)"
    if isinstance(err, MemoryError):
        return "out of memory while reading or writing it (MemoryError)"
    if isinstance(err, pickle.UnpicklingError):
        detail = " ".join(str(err).split())[:200]
        return f"holds a pickle that is not plain tensors or arrays; bindkit does not run pickled code ({detail})"
    message = " ".join(str(err).split())[:300]
    return f"{name}: {message}" if message else name


def _file_in_traceback(err: BaseException) -> str | None:
    """The file the innermost function on ``err``'s way held as a ``Path`` local named like one (``path``, ``file``,
    ``out``, ...): bindkit's readers and writers name theirs so; libraries below them pass strings or handles."""
    tb: TracebackType | None = err.__traceback__
    found = None
    while tb is not None:
        local = tb.tb_frame.f_locals
        found = next((os.fspath(v) for n in _PATH_NAMES if isinstance(v := local.get(n), os.PathLike)), found)
        tb = tb.tb_next
    return found


def resolve_inside(folder: Path, relative: str | os.PathLike[str], where: str, confine: Path | None = None) -> Path:
    """``folder / relative`` resolved (symlinks followed); :class:`DataError` when that leaves ``folder``.

    ``where`` names the file and key the path came from, e.g. ``"runs/x/config.json: encoders.text.kwargs.path"``.
    ``confine``: a folder holding ``folder`` that links inside it may lead to (a hub cache repository's);
    the path as written must still stay in ``folder``.
    """
    base = Path(folder).resolve()
    written = Path(os.path.normpath(base / relative))  # an absolute ``relative`` replaces base, and is refused below
    target = written.resolve()
    allowed = Path(confine).resolve() if confine is not None else base
    if not written.is_relative_to(base) or not target.is_relative_to(allowed):
        raise DataError(
            f"{where}: {os.fspath(relative)!r} resolves to {target}, outside {base}; only files inside that folder "
            "are read (the file was edited, or comes from an untrusted source)"
        )
    return target
