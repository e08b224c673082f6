"""Files from a stranger, fuzzed (hypothesis): a model's ``config.json``, CSV/JSONL manifests, tar shard members.

The property is the same for each: reading any such file ends, within seconds and bounded memory, either in a
result or in one :class:`~bind.errors.BindError` line that names the file (and line or key); never another
exception. Where the generated file is well formed, the result is also checked against what was written.
The recipe fuzz of the same kind is tests/test_recipe_values.py.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_files import saved_model, sparse_member
from test_recipe_values import DELETE, _get, _set, key_paths, watchdog

from bind.data.manifest import manifest
from bind.data.shard_stream import ShardStream
from bind.data.shards import shards
from bind.errors import BindError, DataError
from bind.model import BindModel

SECONDS = 10  # each example takes milliseconds; anything near this is a hang, whatever the machine
FUZZ = settings(
    max_examples=120,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    deadline=None,  # the watchdog bounds each example instead (a slow shared machine is not a failure)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(st.integers(-(2**70), 2**70), st.floats(), text, st.booleans(), st.none())
anything = st.one_of(
    scalars,
    st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6
    ),
)


def one_line_naming(err: BaseException, *files: Path) -> None:
    message = str(err)
    assert "\n" not in message and len(message) < 2000, message
    assert any(str(f) in message for f in files), message


# ---- config.json -------------------------------------------------------------------------------------------
# An encoder argument's value: any type, but numbers only small and >= 0, as a size in a factory: a config that
# asks for width -1 or 10**9 reaches the factory itself (see test_a_negative_size_in_a_config_is_one_line).
kwarg_values = st.one_of(
    st.integers(0, 6),
    st.floats(allow_nan=True),
    text,
    st.booleans(),
    st.none(),
    st.lists(scalars, max_size=2),
    st.dictionaries(text, scalars, max_size=2),
)
SPECIAL_CONFIGS = [b"", b"{}", b"[]", b"null", b"\xff\xfe{", b"[" * 100_000, b'{"a": 1, "a": 2}', b"{" * 50 + b"}" * 50]


@st.composite
def config_files(draw, base: dict[str, Any]) -> bytes:
    document = copy.deepcopy(base)
    paths = key_paths(base)
    kwargs = [p for p in paths if len(p) == 4 and p[2] == "kwargs"]
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.integers(0, 3))
        if choice == 0 and kwargs:  # an encoder argument
            _set(document, draw(st.sampled_from(kwargs)), draw(kwarg_values))
        elif choice == 1:  # a key bindkit reads, or any other place
            _set(document, draw(st.sampled_from([p for p in paths if p not in kwargs])), draw(anything))
        elif choice == 2:  # a key that is not there
            mapping = draw(st.sampled_from([()] + [p for p in paths if isinstance(_get(base, p), dict)]))
            _set(document, (*mapping, draw(text)), draw(anything))
        else:
            path = draw(st.sampled_from(paths))
            _set(document, path, DELETE)
    content = json.dumps(document).encode()
    kind = draw(st.sampled_from(["document"] * 6 + ["spliced", "bytes", "special"]))
    if kind == "spliced":
        cut = draw(st.integers(0, len(content)))
        content = content[:cut] + draw(st.binary(max_size=6)) + content[cut + draw(st.integers(0, 6)) :]
    elif kind == "bytes":
        content = draw(st.binary(max_size=64))
    elif kind == "special":
        content = draw(st.sampled_from(SPECIAL_CONFIGS))
    return content


def test_no_config_json_gets_past_from_pretrained_as_anything_but_a_one_line_error(tmp_path_factory):
    folder = saved_model(tmp_path_factory.mktemp("fuzz") / "model")
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    base = json.loads(config_path.read_text())
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(config_files(base))
    def check(content: bytes) -> None:
        config_path.write_bytes(content)
        start = time.monotonic()
        try:
            with watchdog(SECONDS):
                BindModel.from_pretrained(folder)
            outcomes["ok"] += 1
        except BindError as err:
            one_line_naming(err, config_path, weights_path)
            outcomes["refused"] += 1
        assert time.monotonic() - start < SECONDS

    with torch.random.fork_rng(devices=[]):
        check()
    assert outcomes["ok"] >= 5 and outcomes["refused"] >= 60, outcomes  # the fuzz reaches both sides


def test_a_negative_size_in_a_config_is_one_line(tmp_path):
    folder = saved_model(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["encoders"]["image"]["kwargs"]["width"] = -1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BindError, match=r"config.json: encoders.image.kwargs"):
        BindModel.from_pretrained(folder)


# ---- manifests --------------------------------------------------------------------------------------------
column_names = st.sampled_from(["text", "label", "split", "image", "id", "caption"]) | st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=6
).filter(lambda s: s == s.strip())
words = st.text(st.sampled_from('ab7 ,"\n\r;é语'), min_size=1, max_size=8).filter(str.strip)
cells = st.one_of(
    words,
    words,
    words,
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(["", " ", "a,b", 'say "hi"', "line\nbreak", "\r", "7", "-3", "1" * 30, "x\x00y", "é"]),
)
json_cells = st.one_of(
    cells,
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(text, st.integers(), max_size=1),
)


@st.composite
def manifest_files(draw) -> tuple[str, bytes, str, list[dict[str, Any]] | None]:
    """(file name, content, column to read, rows when the content is them written out whole, else None)."""
    columns = draw(st.lists(column_names, min_size=1, max_size=4, unique=True))
    jsonl = draw(st.booleans())
    rows = [{c: draw(json_cells if jsonl else cells) for c in columns} for _ in range(draw(st.integers(0, 5)))]
    if jsonl:
        for row in rows:  # rows may leave keys out
            for key in [k for k in row if draw(st.integers(0, 9)) == 0]:
                del row[key]
        content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows([list(r.values()) for r in rows])
        content = buffer.getvalue().encode()
    kind = draw(st.sampled_from(["clean"] * 5 + ["spliced", "cut", "bytes", "latin-1", "deep", "repeated"]))
    if kind == "spliced":
        cut = draw(st.integers(0, len(content)))
        content = (
            content[:cut]
            + draw(st.binary(max_size=8) | st.sampled_from([b",", b'"', b"\n", b"{", b"\x00"]))
            + content[cut:]
        )
    elif kind == "cut":
        content = content[: draw(st.integers(0, len(content)))]
    elif kind == "bytes":
        content = draw(st.binary(max_size=64))
    elif kind == "latin-1":
        content = content + "café,ß\n".encode("latin-1")
    elif kind == "repeated":  # a column named twice (CSV), a key twice (JSONL)
        content = f"{columns[0]},{columns[0]}\n".encode() + content if not jsonl else b'{"a": 1, "a": 2}\n' + content
    elif kind == "deep":
        content = content + b'{"text": ' + b"[" * draw(st.integers(60, 5000)) + b"\n"
    column = draw(st.sampled_from([*columns, "missing"]))
    return ("m.jsonl" if jsonl else "m.csv"), content, column, rows if kind == "clean" else None


def readable(rows: list[dict[str, Any]], column: str, jsonl: bool) -> bool:
    """Whether a clean manifest of ``rows`` must read: the rules read_manifest states, as an independent oracle."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if not rows or column not in rows[0]:
        return False
    for row in rows:
        if any(k not in row for k in keys if k not in ("id", "split")):
            return False
        if any(isinstance(v, (list, dict)) or (isinstance(v, str) and "\x00" in v) for v in row.values()):
            return False
        if "label" in keys and (row["label"] is None or not str(row["label"]).strip()):
            return False
        if row[column] in (None, ""):
            return False
    return True


def as_cell(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def test_no_manifest_gets_past_the_reader_as_anything_but_a_one_line_error_naming_it(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests")
    outcomes = {"ok": 0, "refused": 0, "checked": 0}

    @FUZZ
    @given(manifest_files())
    def check(example: tuple[str, bytes, str, list[dict[str, Any]] | None]) -> None:
        name, content, column, rows = example
        for stale in root.iterdir():
            stale.unlink()
        (root / name).write_bytes(content)
        start = time.monotonic()
        try:
            with watchdog(SECONDS):
                items = manifest(root, "*", name, column, kind="text")
            outcomes["ok"] += 1
        except DataError as err:
            one_line_naming(err, root / name)
            outcomes["refused"] += 1
            items = None
        assert time.monotonic() - start < SECONDS
        if rows is not None and rows and readable(rows, column, name.endswith("jsonl")):
            assert items is not None, (content, column)
            assert list(items) == [as_cell(r[column]) for r in rows]
            outcomes["checked"] += 1

    check()
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 30 and outcomes["checked"] >= 5, outcomes


# ---- shard members ---------------------------------------------------------------------------------------
MEMBER_CAP = 4096  # $BINDKIT_MAX_MEMBER_BYTES in this test: "oversize" members are a few KB
CLASSES = 5
label_bytes = st.one_of(
    st.integers(0, CLASSES - 1).map(lambda n: b"%d" % n),
    st.integers(0, CLASSES - 1).map(lambda n: b" %d\n" % n),
    st.sampled_from([b"", b"-1", b"5", b"1e3", b"0x1", b"\xff", b"9" * 40, b"1 2", "٣".encode()]),
    st.binary(max_size=6),
)
text_bytes = st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=20))


@st.composite
def shard_files(draw) -> tuple[bytes, list[tuple[str, str | None, int | None]] | None]:
    """(tar bytes, the expected outcome of each sample when the tar was not damaged afterwards: (key, text or
    None when it is a bad item, label))."""
    out = io.BytesIO()
    expected = []

    def add(name: str, data: bytes, kind: str = "file") -> None:
        if kind == "sparse":
            out.write(sparse_member(name, data, real_size=1 << 40))
            return
        info = tarfile.TarInfo(name)
        info.size = len(data) if kind == "file" else 0
        info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE}[kind]
        out.write(info.tobuf(tarfile.GNU_FORMAT))
        if kind == "file":
            out.write(data + b"\0" * (-len(data) % 512))

    n = draw(st.integers(1, 5))
    for i in range(n + 1):
        key = f"s{i}"
        if i == n:  # a last good sample: bad items before it are reported with it
            add(f"{key}.text.txt", b"last")
            expected.append((key, "last", i))
            continue
        body = draw(text_bytes)
        kind = draw(st.sampled_from(["file"] * 6 + ["sparse", "oversize"]))
        if kind == "oversize":
            body = b"x" * (MEMBER_CAP + 1)
        add(f"{key}.text.txt", body, "file" if kind == "oversize" else kind)
        label = draw(st.none() | label_bytes)
        if label is not None:
            add(f"{key}.label.cls", label)
        extra = draw(st.sampled_from([None] * 4 + ["dir", "link"]))
        if extra is not None:  # not a file: ignored
            add(f"{key}.{extra}.txt", b"", extra)
        try:
            body_text = body.decode("utf-8")
        except UnicodeDecodeError:
            body_text = None
        label_value = i if label is None else _label_or_none(label)
        good = kind == "file" and body_text is not None and label_value is not None
        expected.append((key, body_text if good else None, label_value))
    out.write(b"\0" * 1024)
    content = out.getvalue()
    damage = draw(st.sampled_from(["none"] * 4 + ["cut", "flip"]))
    if damage == "cut":
        content = content[: draw(st.integers(0, len(content)))]
    elif damage == "flip":
        at = draw(st.integers(0, len(content) - 1))
        content = content[:at] + bytes([content[at] ^ draw(st.integers(1, 255))]) + content[at + 1 :]
    return content, expected if damage == "none" else None


def _label_or_none(data: bytes) -> int | None:
    text = data.strip()
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 9):
        return None
    return int(text) if int(text) < CLASSES else None


def test_no_shard_member_stops_a_stream_and_bad_ones_are_counted_by_name(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BINDKIT_MAX_MEMBER_BYTES", str(MEMBER_CAP))
    folder = tmp_path_factory.mktemp("shards")
    outcomes = {"checked": 0, "damaged": 0, "bad": 0}

    @FUZZ
    @given(shard_files())
    def check(example: tuple[bytes, list | None]) -> None:
        content, expected = example
        (folder / "shard-000000.tar").write_bytes(content)
        samples = len(expected) if expected is not None else 3
        index = {"shards": [{"file": "shard-000000.tar", "samples": samples}], "columns": {"text": ["txt"]}}
        (folder / "index.json").write_text(json.dumps({**index, "class_names": [str(c) for c in range(CLASSES)]}))
        start = time.monotonic()
        texts, labels, bad = [], [], []
        with watchdog(SECONDS):
            for members, label, skipped in ShardStream(folder, shuffle=False, shuffle_buffer=0).iterate(0):
                texts.append(members["text"])
                labels.append(label)
                bad += [name for name, _ in skipped]
            try:  # reading by index refuses a damaged shard or a bad label, in one line naming the shard
                shards(folder, "train", path=str(folder), column="text")
            except DataError as err:
                one_line_naming(err, folder / "shard-000000.tar", folder / "index.json")
        assert time.monotonic() - start < SECONDS
        if expected is None:
            outcomes["damaged"] += 1
            return
        good = [(text, label) for _, text, label in expected if text is not None]
        assert list(zip(texts, labels, strict=True)) == good
        assert bad == [f"shard-000000.tar/{key}" for key, text, _ in expected if text is None]
        outcomes["checked"] += 1
        outcomes["bad"] += len(bad)

    check()
    assert outcomes["checked"] >= 40 and outcomes["bad"] >= 20 and outcomes["damaged"] >= 10, outcomes
