"""``bindkit data fetch digits``: downloads from a real HTTP server on 127.0.0.1, verified, nothing half-written.

The server hands out what the real mirrors do, built from ../shared/data: MNIST's t10k files with 10,000 items
(the 8,000 the recipes use and 2,000 made up) and FSDD's release zip with the 2,000 recordings plus other
speakers'. What is kept must be ../shared/data again, byte for byte (the IDX content, the recordings).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import gzip
import http.server
import io
import os
import socket
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_ROOT

from bind.data import check_data_spec
from bind.data.fetch import LOCK_NAME, STAGING_PREFIX, data_status, fetch_data, problems
from bind.errors import DataError
from bind.recipe import DataSpec

MEMBERS = "free-spoken-digit-dataset-1.0.10/recordings/"
RECORDINGS = sorted((DATA_ROOT / "fsdd" / "recordings").glob("*.wav"))
EXTRA_SPEAKERS = ["0_theo_0.wav", "7_yweweler_12.wav"]
KEPT = {"mnist/images-idx3-ubyte.gz", "mnist/labels-idx1-ubyte.gz"} | {f"fsdd/recordings/{p.name}" for p in RECORDINGS}


def _idx(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def _t10k(kept: bytes, header: int, item: int, rng: np.random.Generator) -> bytes:
    """The 8,000 kept items, then 2,000 made-up ones, under a header counting 10,000 (as MNIST's test set)."""
    made_up = rng.integers(0, 256 if item > 1 else 10, 2000 * item, dtype=np.uint8).tobytes()
    magic = struct.unpack(">I", kept[:4])[0]
    return gzip.compress(struct.pack(">II", magic, 10000) + kept[8:header] + kept[header:] + made_up, compresslevel=1)


def _release_zip(altered: str | None = None) -> bytes:
    """FSDD's release archive: the four speakers' recordings, two other speakers' and a README; ``altered``: that
    recording with one byte changed (the zip's own CRC is right: only the digest can tell)."""
    file = io.BytesIO()
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("free-spoken-digit-dataset-1.0.10/README.md", "# Free Spoken Digit Dataset\n")
        for path in RECORDINGS:
            content = path.read_bytes()
            if path.name == altered:
                content = content[:-1] + bytes([content[-1] ^ 1])
            archive.writestr(MEMBERS + path.name, content)
        for name in EXTRA_SPEAKERS:
            archive.writestr(MEMBERS + name, RECORDINGS[0].read_bytes())
    return file.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> str:
    """A mirror at http://127.0.0.1:PORT/: ``good/`` as upstream, and folders whose zip or gzip is damaged."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("mirror")
    images = _t10k(_idx(DATA_ROOT / "mnist/images-idx3-ubyte.gz"), 16, 28 * 28, rng)
    labels = _t10k(_idx(DATA_ROOT / "mnist/labels-idx1-ubyte.gz"), 8, 1, rng)
    good = _release_zip()
    variants = {
        "good": (images, labels, good),
        "truncated_zip": (images, labels, good[: len(good) // 2]),
        "altered_recording": (images, labels, _release_zip(altered="3_lucas_7.wav")),
        "truncated_images": (images[: len(images) // 3], labels, good),
    }
    for name, (images_gz, labels_gz, release) in variants.items():
        (folder / name).mkdir()
        (folder / name / "t10k-images-idx3-ubyte.gz").write_bytes(images_gz)
        (folder / name / "t10k-labels-idx1-ubyte.gz").write_bytes(labels_gz)
        (folder / name / "v1.0.10.zip").write_bytes(release)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fetched(mirror, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return fetch_data("digits", root, mirror=f"{mirror}/good/"), root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {LOCK_NAME}


def test_fetch_keeps_exactly_the_shared_data(fetched, mirror):
    result, root = fetched
    assert result.downloaded == tuple(
        f"{mirror}/good/{name}" for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "v1.0.10.zip")
    )
    assert len(RECORDINGS) == 2000
    assert _files(root) == KEPT  # no other speaker, no README, no archive, no temporary folder
    for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        assert _idx(root / "mnist" / name) == _idx(DATA_ROOT / "mnist" / name)
    for path in RECORDINGS:
        assert (root / "fsdd/recordings" / path.name).read_bytes() == path.read_bytes()
    assert data_status(root)["sets"] == {"digits": "present"}


def test_a_second_fetch_reads_nothing_and_needs_no_network(fetched, closed_port, capsys, monkeypatch):
    from bind.cli import main

    _, root = fetched
    before = {p: (root / p).stat().st_mtime_ns for p in KEPT}
    started = time.perf_counter()
    assert fetch_data("digits", root, mirror=f"http://127.0.0.1:{closed_port}/").downloaded == ()
    assert time.perf_counter() - started < 2  # verifying 2,002 files is quick
    monkeypatch.setenv("BINDKIT_DATA_MIRROR", f"http://127.0.0.1:{closed_port}/")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "fetch", "digits", "--root", str(root), "--no-progress"])
    assert exit_.value.code == 0
    assert f"{root}: digits data already there and verified; nothing downloaded" in capsys.readouterr().out
    assert {p: (root / p).stat().st_mtime_ns for p in KEPT} == before


@pytest.mark.parametrize(
    "variant, says",
    [
        ("truncated_zip", "v1.0.10.zip: not a complete zip archive"),
        ("altered_recording", f"v1.0.10.zip: {MEMBERS}3_lucas_7.wav has SHA-256"),
        ("truncated_images", "t10k-images-idx3-ubyte.gz: not a complete gzip file"),
    ],
)
def test_a_damaged_download_is_refused_and_nothing_is_kept(mirror, tmp_path, variant, says):
    with pytest.raises(DataError) as err:
        fetch_data("digits", tmp_path, mirror=f"{mirror}/{variant}")
    message = str(err.value)
    assert "\n" not in message
    assert says in message and f"{mirror}/{variant}/" in message and "nothing was kept" in message
    if variant == "altered_recording":
        digest = next(
            line.split()[0] for line in (DATA_ROOT / "SHA256SUMS").read_text().splitlines() if "3_lucas_7" in line
        )
        assert f"expected {digest}" in message
    # the MNIST files verified, but the set did not: none of it is in place, and no temporary folder is left
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_an_unreachable_mirror_fails_fast_naming_the_url_and_the_offline_way(
    tmp_path, closed_port, capsys, monkeypatch
):
    from bind.cli import main

    url = f"http://127.0.0.1:{closed_port}/t10k-images-idx3-ubyte.gz"
    monkeypatch.setenv("BINDKIT_DATA_MIRROR", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        fetch_data("digits", tmp_path)
    assert time.perf_counter() - started < 5
    assert f"{url} (Connection refused)" in str(err.value)
    assert "../shared/data" in str(err.value) and "$BINDKIT_DATA" in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        main(["data", "fetch", "digits", "--root", str(tmp_path), "--no-progress"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bindkit data: error: could not fetch") and url in lines[0]
    assert not list(tmp_path.glob("mnist")) and not list(tmp_path.glob(STAGING_PREFIX + "*"))


def test_concurrent_fetches_end_with_one_good_copy(mirror, tmp_path):
    start, results, errors = threading.Barrier(2), [], []

    def fetch() -> None:
        start.wait()
        try:
            results.append(fetch_data("digits", tmp_path, mirror=f"{mirror}/good"))
        except Exception as err:  # noqa: BLE001  (reported by the assert below)
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    # the lock: one downloaded, the other waited and found the data verified
    assert sorted(len(r.downloaded) for r in results) == [0, 3]
    assert _files(tmp_path) == KEPT and problems("digits", tmp_path) == []


def test_validate_names_the_fetch_command_and_downloads_nothing(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BINDKIT_DATA_MIRROR", f"{mirror}/good")
    with pytest.raises(DataError) as err:
        check_data_spec(DataSpec("fsdd", "train"), str(tmp_path), "modalities.audio.train_data")
    assert f"{tmp_path}/fsdd/recordings not found" in str(err.value)
    assert "`bindkit data fetch digits` downloads it (bindkit run does so on first run)" in str(err.value)
    with pytest.raises(DataError) as err:  # data bindkit cannot download: no such advice
        check_data_spec(DataSpec("manifest", "train", {"path": "pairs.csv", "column": "x"}), str(tmp_path), "m")
    assert "bindkit data fetch" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert data_status(tmp_path)["sets"] == {"digits": "missing"}


def test_run_fetches_the_recipes_data_on_first_run(mirror, tmp_path, monkeypatch, capsys):
    from bind.cli.data import load_recipe_fetching_data

    monkeypatch.setenv("BINDKIT_DATA_MIRROR", f"{mirror}/good")
    root = tmp_path / "data"
    args = argparse.Namespace(
        recipe=str(Path(__file__).parents[1] / "recipes" / "digits.yaml"),
        overrides=[f"data_root={root}"],
        trust_plugins=False,
        no_progress=True,
    )
    recipe = load_recipe_fetching_data(args)
    assert recipe.data_root == str(root)
    assert _files(root) == KEPT and problems("digits", root) == []
    assert (
        f"digits: downloading t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, v1.0.10.zip from {mirror}/good into {root}"
        in capsys.readouterr().out
    )


def test_only_the_part_that_differs_is_fetched_again(fetched, mirror, tmp_path):
    _, good = fetched
    for rel in KEPT - {"mnist/labels-idx1-ubyte.gz"}:  # links: the module's fetched copy is never written to
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(good / rel, tmp_path / rel)
    (tmp_path / "mnist/labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\x1f\x40" + bytes(8000)))
    assert data_status(tmp_path)["sets"]["digits"].startswith(
        f"differs: {tmp_path}/mnist/labels-idx1-ubyte.gz: SHA-256"
    )
    result = fetch_data("digits", tmp_path, mirror=f"{mirror}/good")
    assert result.downloaded == (f"{mirror}/good/t10k-labels-idx1-ubyte.gz",)
    assert _idx(tmp_path / "mnist/labels-idx1-ubyte.gz") == _idx(DATA_ROOT / "mnist/labels-idx1-ubyte.gz")
    assert problems("digits", tmp_path) == []


def test_the_recordings_digests_ship_in_the_wheel():
    from importlib.resources import files

    shipped = files("bind.data").joinpath("fsdd_v1.0.10.sha256").read_text().splitlines()
    shared = [line for line in (DATA_ROOT / "SHA256SUMS").read_text().splitlines() if "  fsdd/recordings/" in line]
    assert sorted(shipped) == sorted(shared) and len(shipped) == 2000
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("fsdd_v1.0.10.sha256", glob) for glob in config["package-data"]["bind.data"])
