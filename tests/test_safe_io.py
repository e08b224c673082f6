"""bind/safe_io.py: outputs written whole or not at all, the CLI's one error boundary, bounded JSON and YAML.

Partial writes are real ones: the file-size limit (``RLIMIT_FSIZE``, what ``ulimit -f`` sets) makes a write
past it fail with EFBIG (Python ignores SIGXFSZ), in this process or in a ``bindkit embed`` subprocess.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bind import create_encoder
from bind.cli import main
from bind.errors import ConfigError, DataError
from bind.model import BindModel
from bind.safe_io import atomic_output, atomic_outputs, parse_json, write_atomic
from bind.train.multiseed import write_summary
from bind.typed_yaml import read_recipe_file

TESTS = Path(__file__).parent


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes of any file fail with EFBIG while the block runs (the soft limit; restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- atomic outputs -------------------------------------------------------------------------------------
def test_a_write_that_fails_partway_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old" * 10)
    with file_size_limit(4096), pytest.raises(DataError) as err:
        write_atomic(target, b"x" * 10_000)  # 4 KiB reach the disk, then EFBIG
    message = str(err.value)
    assert message.startswith(f"{target}: not written: File too large (errno {errno.EFBIG})"), message
    assert message.endswith("the previous out.bin is unchanged") and "\n" not in message
    assert folder_state(tmp_path) == {"out.bin": b"old" * 10}  # byte for byte, and no .tmp left
    with file_size_limit(100), pytest.raises(DataError, match=r"not written: .*; nothing was written"):
        write_atomic(tmp_path / "new.bin", b"x" * 1000)
    assert folder_state(tmp_path) == {"out.bin": b"old" * 10}
    write_atomic(target, b"new")  # without a limit the same call replaces the file
    assert folder_state(tmp_path) == {"out.bin": b"new"}


def test_files_written_as_one_unit_are_all_replaced_or_none(tmp_path):
    first, second = tmp_path / "a.npy", tmp_path / "a.names.txt"
    first.write_bytes(b"old a")
    second.write_bytes(b"old names")
    full = pytest.raises(DataError, match=r"a.npy: not written, nor .*a.names.txt: No space left on device")
    with full, atomic_outputs([first, second]) as (f, g):
        f.write(b"new a")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the second file's write fails
    assert folder_state(tmp_path) == {"a.names.txt": b"old names", "a.npy": b"old a"}
    # the second rename fails (its target is a folder): the first, already renamed, is put back
    blocker = tmp_path / "blocker"
    (blocker / "inside").mkdir(parents=True)
    with pytest.raises(DataError, match=r"a.npy: not written"), atomic_outputs([first, blocker]) as (f, g):
        f.write(b"new a")
        g.write(b"new blocker")
    assert folder_state(tmp_path) == {"a.names.txt": b"old names", "a.npy": b"old a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.names.txt", "a.npy", "blocker"]  # no temp, no backup
    with atomic_outputs([first, second]) as (f, g):
        f.write(b"new a")
        g.write(b"new names")
    assert folder_state(tmp_path) == {"a.names.txt": b"new names", "a.npy": b"new a"}


def test_an_exception_in_the_block_replaces_nothing_and_passes_through(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("{}")
    with pytest.raises(KeyError), atomic_output(target) as f:
        f.write(b"[1, 2")
        raise KeyError("a bug")
    assert folder_state(tmp_path) == {"x.json": b"{}"}


def test_an_output_gets_the_permissions_a_new_file_gets(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_atomic(tmp_path / "x", b"1")
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o666 & ~umask


def test_seeds_summary_write_failing_keeps_the_previous_summary(tmp_path):
    write_summary(tmp_path, {"seeds": [0], "figures": {}})
    before = folder_state(tmp_path)
    with file_size_limit(64), pytest.raises(DataError, match=r"seeds.json: not written: File too large"):
        write_summary(tmp_path, {"seeds": list(range(100)), "figures": {"a": {"mean": 0.5}}})
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("name", ["space.png", "space.html"])
def test_a_plot_that_fails_to_write_keeps_the_previous_picture(tmp_path, name):
    pytest.importorskip("matplotlib" if name.endswith("png") else "plotly")
    from test_plot import synthetic_space

    from bind.plot import project, save_figure

    space = synthetic_space()
    projection = project(space.embeddings, 2 if name.endswith("png") else 3, "pca")
    path = tmp_path / name
    path.write_bytes(b"previous picture")
    with file_size_limit(8192), pytest.raises(DataError, match=rf"{name}: not written: File too large"):
        save_figure(space, projection, path, "t")
    assert folder_state(tmp_path) == {name: b"previous picture"}
    assert save_figure(space, projection, path, "t") == path  # and it does write, unlimited
    assert path.read_bytes().startswith(b"\x89PNG" if name.endswith("png") else b"<!doctype html>")


# ---- bindkit embed: the gallery and its names as one unit ------------------------------------------------
@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    model = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=16)}, anchor_modality="image")
    model.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir()
    for i in range(40):
        image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
        image.save(folder / "imgs" / f"{i:02d}_{'long' * 25}.png")  # long names: the names file is 4.6 KB
    return folder


def embed_process(folder: Path, out: str, limit: int | None) -> subprocess.CompletedProcess:
    def limited() -> None:  # in the child, before exec: what `ulimit -f` does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "bind", "embed", "model", "--modality", "image", "--out", out, "imgs"]
    return subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, preexec_fn=limited if limit else None
    )


# the rows file (2688 bytes) cannot be made / the rows are written, and their names file (4.6 KB) fails partway
@pytest.mark.parametrize("limit", [2048, 3000])
def test_a_failed_embed_keeps_the_previous_gallery_byte_for_byte_and_says_so_in_one_line(image_model, limit):
    gallery = image_model / "gallery"
    gallery.mkdir(exist_ok=True)
    shutil.rmtree(gallery / "g.npy.partial", ignore_errors=True)
    old_rows = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    np.save(gallery / "g.npy", old_rows)
    (gallery / "g.names.txt").write_text("".join(f"old{i}\n" for i in range(5)))
    before = folder_state(gallery)

    done = embed_process(image_model, "gallery/g.npy", limit)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("bindkit embed: error: gallery/g.npy: not written, nor gallery/g.names.txt: ")
    assert "File too large" in lines[0] and "the previous g.npy and g.names.txt are unchanged" in lines[0]
    assert folder_state(gallery) == before  # byte for byte, and no temporary file left beside them
    if limit == 2048:  # nothing could be written: nothing is left
        assert lines[0].endswith("unchanged") and sorted(p.name for p in gallery.iterdir()) == ["g.names.txt", "g.npy"]
    else:  # the rows were written: kept, and the same command without the limit finishes from them
        assert lines[0].endswith("kept in gallery/g.npy.partial: run the same command again to resume")
        assert embed_process(image_model, "gallery/g.npy", None).returncode == 0
        assert np.load(gallery / "g.npy").shape == (40, 16) and not (gallery / "g.npy.partial").exists()


def test_embed_names_the_file_it_writes_and_writes_the_pair(image_model, capsys):
    out = image_model / "plain"  # no .npy suffix: numpy's rule adds it, and the message names that file
    with pytest.raises(SystemExit) as code:
        main(["embed", str(image_model / "model"), "--modality", "image", "--out", str(out), str(image_model / "imgs")])
    assert code.value.code == 0
    written = image_model / "plain.npy"
    assert capsys.readouterr().out.startswith(
        f"{written}: 40 x 16 float32 (image); names in {image_model}/plain.names.txt"
    )
    rows = np.load(written)
    names = (image_model / "plain.names.txt").read_text().splitlines()
    assert rows.shape == (40, 16) and len(names) == 40 and Path(names[3]).name.startswith("03_")
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)


# ---- the CLI's error boundary ---------------------------------------------------------------------------
def _safetensor_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")


def _raise_inside(error: Exception, path: Path):
    """A verb whose library call fails while it handles ``path`` (the file is a local, as in bindkit's readers)."""

    def run(args) -> int:
        def read(path: Path) -> None:  # noqa: ARG001 (the boundary finds the file among the locals)
            raise error

        read(path)
        return 0

    return run


LIBRARY_ERRORS = {
    "safetensors": (_safetensor_error, "SafetensorError: Error while serializing"),
    "pickle": (lambda: pickle.UnpicklingError("Weights only load failed"), "holds a pickle"),
    "recursion": (lambda: RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    "unicode": (lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text (byte 0"),
    "csv": (lambda: csv.Error("field larger than field limit (131072)"), "Error: field larger than field limit"),
    "disk full": (
        lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "No space left on device (OSError, errno 28)",
    ),
}


@pytest.mark.parametrize("kind", list(LIBRARY_ERRORS))
def test_a_library_error_reaching_the_cli_is_one_line_naming_the_file(kind, tmp_path, monkeypatch, capsys):
    from bind.cli import embed as embed_verb

    make, what = LIBRARY_ERRORS[kind]
    path = tmp_path / "weights.safetensors"
    monkeypatch.setattr(embed_verb, "run", _raise_inside(make(), path))
    argv = ["embed", "m", "--modality", "image", "--out", "x.npy", "y"]
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err
    assert code.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"bindkit embed: error: {path}: ") and what in err, err

    for debug in (["--debug", *argv], argv):  # --debug, or BINDKIT_DEBUG=1: the traceback, the exception itself
        monkeypatch.setenv("BINDKIT_DEBUG", "1" if debug == argv else "0")
        with pytest.raises(type(make())):
            main(debug)


def test_an_error_with_its_own_file_name_is_named_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    from bind.cli import embed as embed_verb

    def missing(args) -> int:
        open(tmp_path / "nowhere" / "x.npy", "rb")  # noqa: SIM115
        return 0

    monkeypatch.setattr(embed_verb, "run", missing)
    with pytest.raises(SystemExit):
        main(["embed", "m", "--modality", "image", "--out", "x.npy", "y"])
    err = capsys.readouterr().err
    assert (
        err
        == f"bindkit embed: error: {tmp_path}/nowhere/x.npy: No such file or directory (FileNotFoundError, errno 2)\n"
    )

    monkeypatch.setattr(embed_verb, "run", lambda args: 1 // 0)  # not a file's problem: a bug shows its traceback
    with pytest.raises(ZeroDivisionError):
        main(["embed", "m", "--modality", "image", "--out", "x.npy", "y"])


def test_a_real_unpickling_error_from_torch_load_is_one_line(tmp_path, monkeypatch, capsys):
    """torch.load(weights_only=True) of a pickle that calls a function: UnpicklingError, named with its file."""
    from bind.cli import embed as embed_verb

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "tower.pt"
    with open(path, "wb") as f:
        torch.save({"w": Evil()}, f)

    def run(args) -> int:
        torch.load(path, weights_only=True)
        return 0

    monkeypatch.setattr(embed_verb, "run", run)
    with pytest.raises(SystemExit) as code:
        main(["embed", "m", "--modality", "image", "--out", "x.npy", "y"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"bindkit embed: error: {path}: holds a pickle that is not plain tensors"), err


# ---- JSON and YAML: the parser's rules ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ("[" * 100 + "]" * 100, "nested more than 64 levels deep"),
        ("[" * 100_000, "nested more than 64 levels deep"),
        ('{\n  "a": [1, 2\n}', "not valid JSON (line 3, column 1: Expecting ',' delimiter)"),
        ('{"a": [1, 2}', "not valid JSON (column 12: Expecting ',' delimiter)"),
        (b'{"a": "\xff"}', "not UTF-8 text (byte 7"),
    ],
)
def test_json_is_refused_in_one_line_naming_the_file(text, message):
    with pytest.raises(DataError) as err:
        parse_json(text, "/x/config.json", "a model config")
    assert str(err.value).startswith("/x/config.json: ") and message in str(err.value) and "\n" not in str(err.value)


def test_json_figures_may_hold_nan_where_allowed():
    assert json.dumps(parse_json('{"a": NaN}', "eval.json", "figures", allow_nan=True)) == '{"a": NaN}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("embed_dim: 16\nseed: 0\nembed_dim: 32\n", "line 3: duplicate key 'embed_dim' (first on line 1)"),
        ("stages:\n  - steps: 1\n    lr: 0.1\n    steps: 2\n", "line 4: duplicate key 'steps' (first on line 2)"),
        ("modalities: {image: {}, image: {}}\n", "line 1: duplicate key 'image' (first on line 1)"),
    ],
)
def test_a_recipe_with_a_duplicate_key_is_refused_naming_the_line_and_key(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_recipe_file(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_a_fifo_where_a_file_should_be_is_refused_at_once(tmp_path):
    import os

    from bind.safe_io import read_json

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # opened for reading, it would wait for a writer forever
    with pytest.raises(DataError, match=r"config.json: not a regular file \(a FIFO, device or folder\)"):
        read_json(fifo, "a model config")


def test_an_integer_too_long_to_convert_is_one_line(tmp_path):
    from bind.safe_io import read_json

    path = tmp_path / "sizes.json"
    path.write_text('{"total": ' + "9" * 5000 + "}")
    with pytest.raises(DataError, match=r"sizes.json: .*4300 digits.*; expected sizes"):
        read_json(path, "sizes")
