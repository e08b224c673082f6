"""Downloading a data set recipes use, verified, into the data root (``bindkit data fetch NAME``).

A fetchable set is a few *parts*, each one file on a mirror (an archive) that unpacks into files under the
data root. Every part's files are checked by SHA-256 of their content in memory, written into a temporary
folder beside the target, and moved into place (``os.replace``: atomic per file) only when every part
verified, so an interrupted or refused download leaves nothing half-written. A lock on
``DATA_ROOT/.bindkit-fetch.lock`` keeps two processes fetching into one root (ranks of one run, say) from
interleaving: the second finds the data verified and does nothing.

Builders that read a set say so next to their ``required_paths``::

    mnist.fetch = "digits"  # bindkit run fetches it on first run; bindkit validate names the command

``$BINDKIT_DATA_MIRROR=URL`` downloads the same file names from ``URL`` instead of the default mirrors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, did_you_mean
from .datasets import DATASETS, locate_data_root, resolve_data_root

logger = logging.getLogger(__name__)

MIRROR_ENV = "BINDKIT_DATA_MIRROR"
LOCK_NAME = ".bindkit-fetch.lock"
STAGING_PREFIX = ".bindkit-fetch-"
# one attempt per mirror: an unreachable host must fail in seconds, a slow one may still stream
TIMEOUT_S = (5.0, 30.0)  # (connect, read between two chunks)
OFFLINE = "to work offline, put the data in ../shared/data (beside the checkout) or point $BINDKIT_DATA at a folder holding it"


@dataclass(frozen=True)
class Part:
    """One file on a mirror and the files it becomes under the data root."""

    file: str  # its name on every mirror, e.g. "v1.0.10.zip"
    paths: tuple[str, ...]  # what it becomes under the data root: files or folders ("fsdd/recordings")
    mirrors: tuple[str, ...]  # the default mirrors' folders (URL prefixes), tried in order, once each
    problem: Callable[[Path], str | None]  # data root -> None when the part is there and verifies, else what is wrong
    unpack: Callable[[Path], dict[str, bytes]]  # downloaded file -> {path under the root: verified bytes}; DataError


@dataclass(frozen=True)
class Fetchable:
    """A data set ``bindkit data fetch NAME`` downloads: its parts and one line on what and whose it is."""

    name: str
    summary: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_data` did: ``downloaded`` lists the URLs read; empty when the data was there, verified."""

    name: str
    root: Path
    downloaded: tuple[str, ...]


FETCHABLE: dict[str, Fetchable] = {}


def register_fetchable(fetchable: Fetchable) -> Fetchable:
    """Make ``fetchable`` known to ``bindkit data fetch`` and to builders' ``fetch = NAME``."""
    FETCHABLE[fetchable.name] = fetchable
    return fetchable


def get_fetchable(name: str) -> Fetchable:
    if name not in FETCHABLE:
        raise ConfigError(
            f"no data set {name!r} to fetch; {did_you_mean(name, FETCHABLE)}known: {', '.join(sorted(FETCHABLE))}"
        )
    return FETCHABLE[name]


def problems(name: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """What is missing or wrong of set ``name`` under the data root, one line per part; [] when all verifies."""
    base = resolve_data_root(root)
    return [p for p in (part.problem(base) for part in get_fetchable(name).parts) if p]


def fetch_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    progress: bool = False,
    say: Callable[[str], None] = logger.info,
) -> FetchResult:
    """Download set ``name`` into the data root unless it is there and verifies; ``mirror`` (else
    ``$BINDKIT_DATA_MIRROR``) replaces the default mirrors. ``say`` hears where from and to (the CLI prints it).

    Raises :class:`DataError` naming the file and URL when no mirror answers or a download does not verify;
    then nothing of it is kept."""
    fetchable = get_fetchable(name)
    base = resolve_data_root(root)
    if not any(part.problem(base) for part in fetchable.parts):  # verified: no lock, no write (read-only roots too)
        return FetchResult(name, base, ())
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"{base}: cannot create the data folder ({err.strerror}); point --root or $BINDKIT_DATA elsewhere"
        ) from None
    with _locked(base):
        _remove_stale_staging(base)
        missing = [part for part in fetchable.parts if part.problem(base)]
        if not missing:
            return FetchResult(name, base, ())
        mirror = mirror or os.environ.get(MIRROR_ENV) or None
        hosts = [mirror] if mirror else list(dict.fromkeys(part.mirrors[0] for part in missing))
        say(f"{name}: downloading {', '.join(p.file for p in missing)} from {', '.join(hosts)} into {base}")
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=base))
        try:
            urls = tuple(_download_and_unpack(part, staging, mirror, progress, say) for part in missing)
            _move_into_place(staging / "tree", base)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    left = problems(name, base)  # the files as read back from their place, not as they were in memory
    if left:
        raise DataError(f"{name}: fetched into {base} but it does not verify: {left[0]}")
    return FetchResult(name, base, urls)


def fetch_missing(
    specs: Iterable[Any],
    root: str | os.PathLike[str] | None,
    progress: bool = False,
    say: Callable[[str], None] = logger.info,
) -> list[FetchResult]:
    """Fetch the sets that DataSpecs' builders read (``builder.fetch``) whose ``required_paths`` are missing under
    the data root: a recipe's first run. Sets already there are not read; [] when nothing was missing."""
    base = resolve_data_root(root)
    wanted: dict[str, None] = {}
    for spec in specs:
        builder = DATASETS.get(spec.source)
        name = getattr(builder, "fetch", None)
        required = getattr(builder, "required_paths", None)
        if name and required and any(not (base / rel).exists() for rel in required(**spec.args)):
            wanted[name] = None
    return [fetch_data(name, base, progress=progress, say=say) for name in wanted]


def data_status(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The data root bindkit would use, why that one, and each fetchable set's state there (for ``bindkit doctor``):
    ``present`` (verified), ``missing`` (none of its files there) or ``differs: WHAT``."""
    base, origin = locate_data_root(root)
    sets = {}
    for name, fetchable in sorted(FETCHABLE.items()):
        found = [p for p in (part.problem(base) for part in fetchable.parts) if p]
        absent = not any((base / path).exists() for part in fetchable.parts for path in part.paths)
        sets[name] = "present" if not found else "missing" if absent else f"differs: {found[0]}"
    return {"root": str(base.resolve()), "root_from": origin, "sets": sets}


def _download_and_unpack(
    part: Part, staging: Path, mirror: str | None, progress: bool, say: Callable[[str], None]
) -> str:
    """Try each mirror once; the first whose file unpacks and verifies wins. Its files go under ``staging/tree``."""
    urls = [folder.rstrip("/") + "/" + part.file for folder in ([mirror] if mirror else part.mirrors)]
    target = staging / "downloads" / part.file
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            _download(url, target, progress)
            files = part.unpack(target)
        except DataError as err:
            failures.append(f"{url} does not verify: {err}")
        except Exception as err:  # requests' errors (no route, refused, HTTP 404, cut short)
            if not _is_download_error(err):
                raise
            failures.append(f"{url} ({_why(err)})")
        else:
            _write_tree(staging / "tree", files)
            return url
        finally:
            target.unlink(missing_ok=True)
        if url != urls[-1]:
            say(f"{failures[-1]}; trying the next mirror")
    raise DataError(f"could not fetch {part.file}: {'; '.join(failures)}; nothing was kept; {OFFLINE}")


def _write_tree(tree: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)


def _download(url: str, target: Path, progress: bool) -> None:
    """One GET of ``url`` into ``target`` (pooch's downloader: requests, streamed, a tqdm bar on stderr)."""
    import pooch

    if not progress:
        pooch.HTTPDownloader(chunk_size=1 << 16, timeout=TIMEOUT_S)(url, str(target), None)
        return
    from tqdm.auto import tqdm

    # total=1 until pooch sets the Content-Length: pooch tests the bar's truth, which tqdm refuses without a total
    bar = tqdm(desc=target.name, total=1, unit="B", unit_scale=True, leave=True)
    try:
        pooch.HTTPDownloader(progressbar=bar, chunk_size=1 << 16, timeout=TIMEOUT_S)(url, str(target), None)
    except BaseException:
        bar.leave = False  # a failed attempt's bar goes; the error line says what happened
        raise
    finally:
        bar.close()


def _is_download_error(err: Exception) -> bool:
    import requests

    return isinstance(err, requests.RequestException)


def _why(err: Exception) -> str:
    """A requests error in a few words: 'Connection refused', 'HTTP 404', 'timed out' (its text nests three deep)."""
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code}"
    if isinstance(err, requests.Timeout):
        return "timed out"
    text = str(err)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(
        r"(Name or service not known|IncompleteRead)", text
    )
    return match.group(1).strip() if match else type(err).__name__


def _move_into_place(tree: Path, base: Path) -> None:
    """Every verified file from ``tree`` to its place under ``base``; a rename within one folder tree: atomic per file."""
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            dest = base / path.relative_to(tree)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)


def _remove_stale_staging(base: Path) -> None:
    """Temporary folders a killed fetch left behind (the lock is held: no live fetch owns one)."""
    for path in base.glob(STAGING_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``base/.bindkit-fetch.lock`` (POSIX; elsewhere the per-file renames only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a second fetch may download again, but never leaves a torn file
        yield
        return
    with open(base / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
