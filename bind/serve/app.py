"""The Starlette app behind ``bindkit serve``: ``GET /`` (the page), ``POST /search``, ``GET /item/G/ROW``, ``GET /info``.

Every client mistake is answered in one place, :func:`_search_form`, as JSON ``{"error": "one line"}`` with a 4xx
status, and the server goes on serving: a body over the size limit is refused from its Content-Length or, when it
lies or has none, as soon as the bytes read pass the limit (never read whole); a file's name only lends its suffix
(lower-cased, letters and digits), which must be one the modality's encoder reads; the upload is written to a
private temporary folder and deleted after; a decoder's error about it comes back with the temporary path replaced
by ``upload.SUFFIX``. At most ``limits.model_calls`` queries run the model at once and ``limits.max_waiting``
requests may wait: one more is answered 503 at once, so memory stays bounded under any load.

Gallery items are served by gallery name and row number only, from the paths the gallery itself holds: a client
never names a path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import BindError
from ..safe_io import BOUNDARY_ERRORS, error_line

if TYPE_CHECKING:
    from ..model import BindModel
    from ..retrieval import SearchIndex

log = logging.getLogger(__name__)

# what a browser needs to show a gallery file; a suffix not here is searched but not previewed
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
}
FIELDS = ("modality", "text", "file", "k", "gallery")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_CHUNK = 1 << 16
_NUMBER = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask and how much work the server takes on at once."""

    max_upload_bytes: int = 16 << 20  # the whole request body; a WAV or PNG is far smaller
    max_k: int = 1000
    max_text_chars: int = 2000  # a query text; longer ones are cut by the text encoder anyway
    model_calls: int = 1  # queries encoded at once: torch already uses every core for one
    max_waiting: int = 64  # requests in /search at once (reading, waiting or encoding); more get 503


@dataclass
class Gallery:
    """One searchable gallery: ``index`` rows of ``modality``; ``files``: its names are file paths (relative ones
    read from ``root``), served at ``/item/NAME/ROW``; else its names are shown as they are (texts)."""

    name: str
    modality: str
    index: SearchIndex
    files: bool
    root: Path = field(default_factory=Path.cwd)

    def file(self, row: int) -> Path:
        return self.root / self.index.names[row]


class ClientError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _TooLarge(Exception):
    pass


def page_html() -> str:
    """The search page, shipped as package data (bind/serve/static/index.html)."""
    return resources.files("bind.serve").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(model: BindModel, galleries: list[Gallery], limits: ServeLimits | None = None) -> Starlette:
    """A Starlette app searching ``galleries`` with ``model``'s queries of any of its modalities."""
    limits = limits or ServeLimits()
    names = [g.name for g in galleries]
    if len(set(names)) != len(names):
        raise ValueError(f"gallery names must differ, got {names}")
    service = _Service(model, {g.name: g for g in galleries}, limits)
    page = page_html()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [
        Route("/", index),
        Route("/info", service.info),
        Route("/search", service.search, methods=["POST"]),
        Route("/item/{gallery}/{row:int}", service.item),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _http_error(request: Request, exc: HTTPException) -> Response:  # 404, 405 as JSON too
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("bindkit serve: %s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the traceback"}, 500)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())[:500]}, status_code=status)


class _Service:
    def __init__(self, model: BindModel, galleries: dict[str, Gallery], limits: ServeLimits) -> None:
        self.model, self.galleries, self.limits = model, galleries, limits
        self.model_calls = asyncio.Semaphore(limits.model_calls)
        self.busy = 0  # requests inside /search; the event loop is one thread, so a plain count is exact

    async def info(self, request: Request) -> Response:
        modalities = [
            {
                "name": m,
                "takes_text": bool(getattr(self.model[m], "takes_text", False)),
                "file_suffixes": list(self.model[m].file_suffixes or []),
            }
            for m in self.model.modalities
        ]
        galleries = [
            {"name": g.name, "modality": g.modality, "size": len(g.index), "files": g.files}
            for g in self.galleries.values()
        ]
        return JSONResponse(
            {
                "modalities": modalities,
                "galleries": galleries,
                "max_upload_bytes": self.limits.max_upload_bytes,
                "max_k": self.limits.max_k,
            }
        )

    async def item(self, request: Request) -> Response:
        gallery = self.galleries.get(request.path_params["gallery"])
        row = request.path_params["row"]
        if gallery is None:
            return _error(404, f"no gallery {request.path_params['gallery']!r}; galleries: {', '.join(self.galleries)}")
        if not gallery.files:
            return _error(404, f"gallery {gallery.name!r} holds texts, not files; its items are in the results")
        if row >= len(gallery.index):
            return _error(404, f"gallery {gallery.name!r} has {len(gallery.index)} items; no row {row}")
        path = gallery.file(row)
        media_type = MEDIA_TYPES.get(path.suffix.lower())
        if media_type is None:
            return _error(404, f"{gallery.name} row {row}: no preview for {path.suffix or 'suffixless'} files")
        if not path.is_file():
            return _error(404, f"{gallery.name} row {row}: the file is no longer there")
        return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    async def search(self, request: Request) -> Response:
        if self.busy >= self.limits.max_waiting:
            return _error(503, f"busy: {self.busy} searches in progress; try again in a moment")
        self.busy += 1
        scratch: Path | None = None
        try:
            form = await _read_form(request, self.limits.max_upload_bytes)
            try:
                modality, query, k, galleries, scratch = await self._parse(form)
            finally:
                await form.close()  # the parser's spooled copy of the upload
            async with self.model_calls:
                hits = await run_in_threadpool(self._run, modality, query, k, galleries, scratch)
            return JSONResponse(hits)
        except ClientError as err:
            return _error(err.status, err.message)
        finally:
            self.busy -= 1
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    async def _parse(self, form: Any) -> tuple[str, str, int, list[Gallery], Path | None]:
        """``(modality, query, k, galleries, scratch)``: a text, or the path of the upload saved in ``scratch``."""
        unknown = sorted(set(form.keys()) - set(FIELDS))
        if unknown:
            raise ClientError(400, f"unknown field {unknown[0]!r}; expected {', '.join(FIELDS)}")
        for key in FIELDS:
            if len(form.getlist(key)) > 1:
                raise ClientError(400, f"field {key!r} given {len(form.getlist(key))} times; expected once")
        modality = form.get("modality")
        if not isinstance(modality, str) or not modality:
            raise ClientError(400, f"field 'modality' missing; the model has: {', '.join(self.model.modalities)}")
        if modality not in self.model.modalities:
            raise ClientError(400, f"unknown modality {modality!r}; the model has: {', '.join(self.model.modalities)}")
        k = _parse_k(form.get("k", "10"), self.limits.max_k)
        galleries = self._galleries(form.get("gallery"))
        text, upload = form.get("text"), form.get("file")
        takes_text = bool(getattr(self.model[modality], "takes_text", False))
        if (text is None) == (upload is None):
            what = "'text'" if takes_text else "'file'"
            raise ClientError(400, f"send one of the fields 'text' or 'file' ({modality} queries take {what})")
        if text is not None:
            if not takes_text:
                raise ClientError(400, f"modality {modality!r} takes a file, not text; send it as the field 'file'")
            if not isinstance(text, str) or not text.strip():
                raise ClientError(400, "field 'text': expected a non-empty text")
            if len(text) > self.limits.max_text_chars:
                raise ClientError(400, f"field 'text': {len(text)} characters; at most {self.limits.max_text_chars}")
            return modality, text, k, galleries, None
        if takes_text:
            raise ClientError(400, f"modality {modality!r} takes text; send it as the field 'text'")
        if not isinstance(upload, UploadFile):
            raise ClientError(400, "field 'file': expected a file upload (multipart with a filename)")
        suffix = _suffix(upload.filename)
        accepted = self.model[modality].file_suffixes
        if accepted and suffix not in accepted:
            got = f"a {suffix} file" if suffix else "a file without a known suffix"
            raise ClientError(415, f"field 'file': {got}; {modality} takes {', '.join(accepted)}")
        scratch = Path(tempfile.mkdtemp(prefix="bindkit-serve-"))  # mode 0700: this user's alone
        path = scratch / f"upload{suffix}"
        with open(path, "wb") as out:
            while chunk := await upload.read(_CHUNK):
                out.write(chunk)
        return modality, str(path), k, galleries, scratch

    def _galleries(self, wanted: object) -> list[Gallery]:
        if wanted is None or wanted == "":
            return list(self.galleries.values())
        if not isinstance(wanted, str) or wanted not in self.galleries:
            raise ClientError(400, f"field 'gallery': no gallery {wanted!r}; galleries: {', '.join(self.galleries)}")
        return [self.galleries[wanted]]

    def _run(self, modality: str, query: str, k: int, galleries: list[Gallery], scratch: Path | None) -> list[dict]:
        """Encode the query and merge each gallery's top ``k``: best first, ties in gallery order (a stable sort)."""
        try:
            embedding = self.model.encode(modality, [query], show_progress_bar=False)
        except (BindError, *BOUNDARY_ERRORS) as err:
            message = str(err) if isinstance(err, BindError) else error_line(err)
            if scratch is not None:  # the client knows its file as an upload, not by our temporary path
                message = message.replace(str(scratch / "upload"), "upload")
                message = message.replace(str(scratch), "upload")
            raise ClientError(400, message) from None
        found: list[dict] = []
        for gallery in galleries:
            if not len(gallery.index):
                continue
            scores, rows = gallery.index.search_indices(embedding, min(k, len(gallery.index)))
            for score, row in zip(scores[0], rows[0], strict=True):
                row = int(row)
                found.append(
                    {
                        "item": gallery.index.names[row],
                        "modality": gallery.modality,
                        "score": float(score),
                        "gallery": gallery.name,
                        "row": row,
                        "url": f"/item/{gallery.name}/{row}" if gallery.files else None,
                    }
                )
        order = np.argsort([-hit["score"] for hit in found], kind="stable")
        return [found[i] for i in order[:k]]


async def _read_form(request: Request, limit: int) -> Any:
    """The multipart (or urlencoded) form of ``request``, reading at most ``limit`` bytes of body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ClientError(415, f"content type {kind or 'none'!r}; expected multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ClientError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise ClientError(413, f"upload of {int(declared):,} bytes; at most {limit:,} (--max-upload-mb)")
    seen = 0
    receive = request.receive

    async def counted() -> dict:  # a body with no Content-Length, or a false one, stops at the limit all the same
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    try:
        # one file, a few fields, each field small: a form of a million tiny parts is refused by the parser
        return await Request(request.scope, counted).form(max_files=1, max_fields=len(FIELDS), max_part_size=1 << 16)
    except _TooLarge:
        raise ClientError(413, f"upload of more than {limit:,} bytes; at most {limit:,} (--max-upload-mb)") from None
    except ClientDisconnect:
        raise ClientError(400, "the client went away before the upload ended") from None
    except HTTPException as err:  # the multipart parser's own complaints (malformed, too many parts)
        raise ClientError(400, f"malformed form: {err.detail}") from None


def _parse_k(value: object, max_k: int) -> int:
    text = value.strip() if isinstance(value, str) else ""
    if not _NUMBER.fullmatch(text) or not 1 <= int(text) <= max_k:
        raise ClientError(400, f"field 'k': expected a whole number from 1 to {max_k}, got {str(value)[:40]!r}")
    return int(text)


def _suffix(filename: str | None) -> str:
    """The upload's suffix, lower case, if it is a plain one (``.wav``); the rest of the client's name is ignored."""
    suffix = Path((filename or "").replace("\\", "/")).suffix.lower()
    return suffix if _SUFFIX.fullmatch(suffix) else ""
