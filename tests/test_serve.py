"""bindkit serve's API against a real uvicorn server on 127.0.0.1: answers equal SearchIndex.search of the same query,
hostile requests are each one JSON line with a 4xx status and leave the server serving, and a concurrent load is
answered without an error, every answer correct."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from bind.data.digits import DIGIT_WORDS
from bind.retrieval import SearchIndex
from bind.runs import load_run
from bind.serve import Gallery, ServeLimits, background, create_app

PROMPTS = [f"a handwritten {word}" for word in DIGIT_WORDS]
LIMIT = 256 << 10  # a small upload limit, so refusing a larger one costs the test little


def digit_pngs(data_root: Path, folder: Path, rows: range) -> list[str]:
    """MNIST eval digits as PNG files named by row and label."""
    from PIL import Image

    from bind.data.digits import read_idx

    images = read_idx(data_root / "mnist" / "images-idx3-ubyte.gz")
    labels = read_idx(data_root / "mnist" / "labels-idx1-ubyte.gz")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in rows:
        path = folder / f"{i}_digit{labels[i]}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(str(path))
    return paths


def galleries_for(model, data_root: Path, folder: Path) -> list[Gallery]:
    """Ten digit images, the ten digits spoken by the unseen speaker (take 1), and the ten prompts."""
    images = digit_pngs(data_root, folder / "pngs", range(6000, 6010))
    wavs = [str(data_root / "fsdd" / "recordings" / f"{d}_nicolas_1.wav") for d in range(10)]
    return [
        Gallery("image", "image", SearchIndex(model.encode("image", images), names=images), files=True),
        Gallery("audio", "audio", SearchIndex(model.encode("audio", wavs), names=wavs), files=True),
        Gallery("text", "text", SearchIndex(model.encode("text", PROMPTS), names=PROMPTS), files=False),
    ]


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type, as a browser or curl -F sends it."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    if file is not None:
        name, data = file
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, headers, body bytes)`` of one request over a fresh connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def search(url: str, fields: dict[str, str], file: tuple[str, bytes] | None = None) -> tuple[int, object]:
    body, kind = multipart(fields, file)
    status, _, data = request(url, "POST", "/search", body, {"Content-Type": kind})
    return status, json.loads(data)


def expected(model, gallery: Gallery, modality: str, query: str, k: int) -> list[tuple[str, float]]:
    return gallery.index.search(model.encode(modality, [query], show_progress_bar=False), k=k)[0]


@pytest.fixture(scope="module")
def served(tiny_run, data_root, tmp_path_factory):
    """``(url, model, galleries by name, scratch folder)``: one server for the module; uploads go to ``scratch``."""
    model, _ = load_run(tiny_run)
    galleries = galleries_for(model, data_root, tmp_path_factory.mktemp("gallery"))
    scratch = tmp_path_factory.mktemp("uploads")
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)  # where the server's private upload folders are made
    try:
        with background(create_app(model, galleries, ServeLimits(max_upload_bytes=LIMIT))) as url:
            yield url, model, {g.name: g for g in galleries}, scratch
    finally:
        tempfile.tempdir = saved


def wav(data_root: Path, name: str = "7_nicolas_1.wav") -> tuple[str, bytes]:
    return name, (data_root / "fsdd" / "recordings" / name).read_bytes()


# ---- answers ---------------------------------------------------------------------------------------------------------
def test_each_pair_of_modalities_answers_as_search_index_does(served, data_root):
    url, model, galleries, _ = served
    png = Path(galleries["image"].index.names[3])
    cases = [  # (query modality, text or file, gallery)
        ("text", "a handwritten seven", "image"),
        ("audio", wav(data_root), "audio"),
        ("image", (png.name, png.read_bytes()), "text"),
        ("audio", wav(data_root, "3_nicolas_2.wav"), "text"),  # a recording in no gallery
    ]
    for modality, query, name in cases:
        fields = {"modality": modality, "k": "4", "gallery": name}
        if isinstance(query, str):
            status, hits = search(url, {**fields, "text": query})
            reference = query
        else:
            status, hits = search(url, fields, query)
            reference = str(data_root / "fsdd" / "recordings" / query[0]) if modality == "audio" else str(png)
        assert status == 200, hits
        want = expected(model, galleries[name], modality, reference, 4)
        assert [h["item"] for h in hits] == [item for item, _ in want]
        np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in want], atol=1e-5)
        assert all(h["modality"] == galleries[name].modality and h["gallery"] == name for h in hits)
    # the same recording as a gallery item: its own row first, whatever the model's quality
    status, hits = search(url, {"modality": "audio", "k": "1", "gallery": "audio"}, wav(data_root))
    assert hits[0]["item"].endswith("7_nicolas_1.wav") and hits[0]["score"] == pytest.approx(1, abs=1e-5)


def test_without_a_gallery_filter_the_galleries_merge_best_first(served):
    url, model, galleries, _ = served
    status, hits = search(url, {"modality": "text", "text": "the digit two", "k": "12"})
    assert status == 200
    pooled = [
        (score, g.name, item)
        for g in galleries.values()
        for item, score in expected(model, g, "text", "the digit two", 12)
    ]
    want = sorted(pooled, key=lambda hit: -hit[0])[:12]
    assert [(h["gallery"], h["item"]) for h in hits] == [(name, item) for _, name, item in want]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len({h["gallery"] for h in hits}) >= 2  # 12 results, 10 items a gallery: the merge is tested


def test_items_are_served_by_gallery_and_row_with_their_type(served):
    url, _, galleries, _ = served
    for name, kind in (("image", "image/png"), ("audio", "audio/wav")):
        status, headers, body = request(url, "GET", f"/item/{name}/2")
        assert status == 200 and headers["content-type"] == kind
        assert body == Path(galleries[name].index.names[2]).read_bytes()
    for path in (
        "/item/image/10",
        "/item/text/0",
        "/item/nope/0",
        "/item/image/-1",
        "/item/image/..%2F..%2Fetc%2Fpasswd",
    ):
        status, _, body = request(url, "GET", path)
        assert status == 404 and set(json.loads(body)) == {"error"}, path
    info = json.loads(request(url, "GET", "/info")[2])
    assert [(g["name"], g["size"]) for g in info["galleries"]] == [("image", 10), ("audio", 10), ("text", 10)]
    assert {m["name"] for m in info["modalities"]} == {"image", "audio", "text", "video"}
    status, headers, page = request(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="results"' in page


# ---- hostile requests ------------------------------------------------------------------------------------------------
def _raw(url: str, head: bytes, body_parts: list[bytes]) -> tuple[int, dict]:
    """Send ``head`` and then as much of ``body_parts`` as the server reads; the status and JSON it answers."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def hostile_cases(data_root: Path) -> list[tuple[str, int, str, object]]:
    """(what, status, a fragment of the error line, the request: fields and file, or raw bytes)."""
    seven = wav(data_root)[1]
    return [
        (
            "unknown modality",
            400,
            "the model has: image, text, audio, video",
            ({"modality": "smell", "text": "x"}, None),
        ),
        ("no modality", 400, "field 'modality' missing", ({"text": "a seven"}, None)),
        ("neither text nor file", 400, "send one of the fields", ({"modality": "text"}, None)),
        ("both", 400, "send one of", ({"modality": "audio", "text": "x"}, ("a.wav", seven))),
        ("extra field", 400, "unknown field 'path'", ({"modality": "text", "text": "x", "path": "/etc"}, None)),
        ("k zero", 400, "field 'k'", ({"modality": "text", "text": "x", "k": "0"}, None)),
        ("k absurd", 400, "from 1 to 1000", ({"modality": "text", "text": "x", "k": "1001"}, None)),
        ("k not a number", 400, "field 'k'", ({"modality": "text", "text": "x", "k": "1e9"}, None)),
        (
            "unknown gallery",
            400,
            "galleries: image, audio, text",
            ({"modality": "text", "text": "x", "gallery": "x"}, None),
        ),
        ("text to a file modality", 400, "takes a file", ({"modality": "audio", "text": "seven"}, None)),
        ("file to the text modality", 400, "takes text", ({"modality": "text"}, ("a.txt", b"seven"))),
        ("wrong suffix", 415, "a .exe file; audio takes .wav", ({"modality": "audio"}, ("seven.exe", seven))),
        ("no suffix", 415, "without a known suffix", ({"modality": "audio"}, ("seven", seven))),
        ("a text posing as a WAV", 400, "upload.wav", ({"modality": "audio"}, ("seven.wav", b"not a wav\n" * 50))),
        ("truncated PNG", 400, "upload.png", ({"modality": "image"}, ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40))),
        ("empty file", 400, "upload.wav", ({"modality": "audio"}, ("seven.wav", b""))),
        ("huge, no Content-Length", 413, "at most 262,144", "chunked"),
        ("huge Content-Length, body never sent", 413, "at most 262,144", "declared"),
        ("JSON body", 415, "expected multipart/form-data", "json"),
    ]


def test_hostile_requests_are_one_line_4xx_and_the_server_goes_on(served, data_root):
    url, model, galleries, scratch = served
    parts = urlsplit(url)
    for what, status, fragment, spec in hostile_cases(data_root):
        if spec == "chunked":  # 64 KB chunks past the limit, no length announced: refused once the count passes it
            head = f"POST /search HTTP/1.1\r\nHost: {parts.netloc}\r\nTransfer-Encoding: chunked\r\n"
            head += "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            chunks = [b"%x\r\n%s\r\n" % (len(start), start)] + [b"10000\r\n" + b"x" * 0x10000 + b"\r\n"] * 6
            got, body = _raw(url, head.encode(), chunks)  # 6 x 64 KB: past the 256 KB limit
        elif spec == "declared":  # a claim of 10 GB: refused from the header alone, before any body is read
            head = f"POST /search HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {10 << 30}\r\n"
            head += "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            got, body = _raw(url, head.encode(), [b"--b\r\n"])
        elif spec == "json":
            got, _, raw = request(url, "POST", "/search", b'{"text": "x"}', {"Content-Type": "application/json"})
            body = json.loads(raw)
        else:
            got, body = search(url, *spec)
        assert got == status, (what, body)
        assert set(body) == {"error"} and "\n" not in body["error"], what
        assert fragment in body["error"], (what, body["error"])
        assert str(scratch) not in body["error"] and "bindkit-serve-" not in body["error"], what
        # still serving, correctly
        assert search(url, {"modality": "text", "text": "a seven", "k": "1"})[0] == 200, f"after {what}"
    assert list(scratch.iterdir()) == []  # every upload's private folder deleted


def test_client_file_names_lend_only_their_suffix(served, data_root):
    url, model, galleries, scratch = served
    name, data = wav(data_root)
    want = search(url, {"modality": "audio", "k": "3"}, (name, data))
    for hostile in ("../../../../tmp/evil.WAV", "/etc/passwd.wav", "..\\..\\x.wav", 'a"b.wav', "\u202e.wav"):
        assert search(url, {"modality": "audio", "k": "3"}, (hostile, data)) == want, hostile
    assert not Path("/tmp/evil.WAV").exists() and list(scratch.iterdir()) == []


def test_a_full_queue_is_answered_503_at_once(served):
    """One search stays inside /search (its body half sent); with room for one, the next is refused quickly."""
    _, model, galleries, _ = served
    app = create_app(model, list(galleries.values()), ServeLimits(max_waiting=1))
    with background(app) as url:
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as slow:
            body, kind = multipart({"modality": "text", "text": "a seven"})
            slow.sendall(f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n".encode())
            slow.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            for _ in range(100):  # until the server has taken the slow request in
                status, answer = search(url, {"modality": "text", "text": "a seven"})
                if status == 503:
                    break
            assert status == 503 and "busy" in answer["error"]
            slow.sendall(body[10:])
            response = http.client.HTTPResponse(slow)
            response.begin()
            assert response.status == 200
        assert search(url, {"modality": "text", "text": "a seven"})[0] == 200


# ---- load ------------------------------------------------------------------------------------------------------------
def test_concurrent_clients_get_no_error_and_every_answer_right(served, data_root):
    url, model, galleries, _ = served
    png = Path(galleries["image"].index.names[5])
    queries = [
        ({"modality": "text", "text": "a handwritten four", "k": "5"}, None),
        ({"modality": "audio", "k": "5"}, wav(data_root)),
        ({"modality": "image", "k": "5"}, (png.name, png.read_bytes())),
    ]
    want = [search(url, *q) for q in queries]
    assert all(status == 200 for status, _ in want)
    failures: list[str] = []

    def client(number: int) -> None:
        for i in range(10):
            which = (number + i) % len(queries)
            try:
                got = search(url, *queries[which])
            except Exception as err:  # a dropped connection counts as an error like any other
                got = (0, repr(err))
            if got != want[which]:
                failures.append(f"client {number} request {i}: {str(got)[:200]}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_the_page_ships_in_the_wheel_and_loads_from_the_installed_package(tmp_path):
    """pyproject's package-data carries bind/serve/static/index.html: read it from an installed wheel, not the tree."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("bindkit-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "import bind.serve as s; print(s.__file__); print(len(s.page_html()))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=tmp_path
    ).stdout
    where, size = shown.split()
    assert Path(where).is_relative_to(tmp_path / "site")  # the installed copy, not this checkout
    assert int(size) == len((root / "bind" / "serve" / "static" / "index.html").read_text(encoding="utf-8"))
