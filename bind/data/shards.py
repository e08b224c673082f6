"""Sharded datasets in the WebDataset tar format: streamed from local shards, shuffled with a buffer.

Many small files read slowly from network disks and object stores (one open per file).
:func:`write_shards` packs the rows of a manifest (bind/data/manifest.py) into tar shards of about
1000 samples in the WebDataset layout, one sample per key and one member per modality column,
named ``KEY.COLUMN.EXT`` after the original file, and writes ``index.json`` (shards, sample counts,
columns, class names) so a reader knows the length without scanning::

    out/shard-000000.tar   000000.audio.wav 000000.image.png 000000.label.cls 000000.text.txt 000001.audio.wav ...
    out/index.json

Any WebDataset reader reads these shards (``webdataset.WebDataset(urls)``). bindkit's own,
:class:`ShardStream`, is an ``IterableDataset``:

* each epoch the shard order is shuffled by ``(seed, epoch)``, identically on every rank; shard
  ``i`` of that order goes to rank ``i % world_size``, and a rank's shards are dealt round-robin to
  its DataLoader workers. No sample is read twice in an epoch and none is lost. Shards are the
  unit of splitting: when they do not divide evenly, some ranks or workers read one shard more
  than others that epoch (and a worker with no shard yields nothing), so write a multiple of
  ``world_size * num_workers`` shards of equal size, or loop endlessly as the trainer does;
* samples are shuffled by a buffer of ``shuffle_buffer`` samples seeded by ``(seed, epoch, rank, worker)``;
* each pass is the next epoch. :meth:`ShardStream.set_epoch` sets it: call it before each pass
  when DataLoader workers are not persistent (each pass then starts from a fresh copy);
* images decode in memory to PIL images, audio to ``(waveform, sample_rate)``, text to ``str``,
  ``.npy`` to arrays: the encoders' ``preprocess`` gets the same raw items as from loose files;
* a sample that cannot be decoded or preprocessed is skipped and reported as ``(name, message)``
  in the last element of the next sample yielded (the convention of ``Preprocessed.drain_bad``).

:class:`ShardPairs` yields ``(anchor_x, x, label, bad)`` for a bind stage with ``pairing: row``,
:class:`ShardPreprocessed` ``(x, label, bad)`` for a pretrain stage. Wiring one into a loader::

    pairs = ShardPairs("shards/", "image", "audio", image_encoder.preprocess, audio_encoder.preprocess,
                       seed=seed, rank=dist.rank, world_size=dist.world_size)
    collate = lambda b: (image_encoder.collate([s[0] for s in b]), audio_encoder.collate([s[1] for s in b]),
                         torch.tensor([s[2] for s in b]))
    loader = DataLoader(pairs, batch_size=local_batch, num_workers=w, persistent_workers=w > 0,
                        drop_last=True, collate_fn=collate_with_bad(collate))
    for anchor_x, x, labels, bad in loader: ...

``source: shards`` in a recipe (``args: {path: DIR, column: image}``) gives a map-style
:class:`~bind.data.Items` view of one column instead, read by member offsets: random access for
evaluation and the map-style trainer, not streaming.
"""

from __future__ import annotations

import os
import reprlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..safe_io import max_member_bytes, member_problem, read_json, read_member, resolve_inside
from .datasets import Items, register_dataset
from .decoders import decode
from .pairs import BadItem

INDEX = "index.json"


# ---- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardIndex:
    """What ``index.json`` says about a folder of shards."""

    directory: Path
    files: list[str]  # shard file names, in writing order
    counts: list[int]  # samples per shard
    columns: dict[str, list[str]]  # modality column -> file extensions seen
    class_names: list[str] | None
    split: str | None = None  # the split the shards were written for (None: all rows, each with its split.txt)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardIndex:
        """The index of a shard folder (or of its ``index.json``); every shard must exist."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / INDEX
        if not file.is_file():
            raise DataError(f"{file} not found: write shards with `bindkit shard MANIFEST --out {file.parent}`")
        raw = read_json(file, "a shard index written by `bindkit shard`")
        index = cls(file.parent, *_index_fields(file, raw))
        for i, name in enumerate(index.files):
            _check_shard_name(file, i, name)
        missing = [f for f in index.files if not (index.directory / f).is_file()]
        if missing:
            raise DataError(f"{file} lists {len(missing)} shard(s) not in {index.directory}: {', '.join(missing[:5])}")
        return index

    def check_column(self, column: str) -> None:
        if column not in self.columns:
            raise DataError(f"{self.directory / INDEX}: no column {column!r}; columns are {', '.join(self.columns)}")


def _index_fields(file: Path, raw: Any) -> tuple[Any, ...]:
    """``(files, counts, columns, class_names, split)`` of a parsed index.json, each key's type checked."""

    def refuse(key: str, expected: str, got: Any) -> DataError:
        shown = reprlib.repr(got)
        return DataError(
            f"{file}: {key}: expected {expected}, got {shown}; not a shard index written by `bindkit shard`"
        )

    if not isinstance(raw, dict):
        raise refuse("(top level)", "a JSON object", raw)
    shards = raw.get("shards")
    if not isinstance(shards, list):
        raise refuse("shards", "a list of {file, samples}", shards)
    files, counts = [], []
    for i, shard in enumerate(shards):
        count = shard.get("samples") if isinstance(shard, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise refuse(f"shards[{i}].samples", "a count of samples (an integer >= 0)", count)
        files.append(shard.get("file"))
        counts.append(count)
    columns = raw.get("columns")
    if not isinstance(columns, dict) or not all(
        isinstance(exts, list) and all(isinstance(e, str) for e in exts) for exts in columns.values()
    ):
        raise refuse("columns", "a mapping of column -> list of file extensions", columns)
    class_names = raw.get("class_names")
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        raise refuse("class_names", "a list of class names or null", class_names)
    split = raw.get("split")
    if split is not None and not isinstance(split, str):
        raise refuse("split", "a split name or null", split)
    return files, counts, columns, class_names, split


def _check_shard_name(index_file: Path, i: int, name: Any) -> None:
    """Raise :class:`DataError` unless shard ``name`` of ``index_file`` is a file inside the index's folder.

    The index is data a stranger may hand over: ``../../etc/hostname``, ``/etc/passwd`` or a symlink out of
    the folder is refused before anything is opened.
    """
    where = f"{index_file}: shards[{i}].file"
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: expected a shard file name, got {name!r}")
    resolve_inside(index_file.parent, name, where)


@dataclass
class ShardSample:
    """One sample as read from a shard: ``members`` maps a column to its (extension, bytes).

    ``problem``: why a member of it was not read (sparse, over the size cap); such a sample is a bad item."""

    shard: str
    key: str
    ordinal: int  # position in the whole shard set (shard by shard): the index augmentation seeds on
    members: dict[str, tuple[str, bytes]]
    problem: str | None = None

    @property
    def name(self) -> str:
        return f"{self.shard}/{self.key}"

    def label(self, num_classes: int | None = None) -> int:
        """The ``label.cls`` class index; without one each sample is its own class, as in a manifest.

        Raises :class:`BadItem` when ``label.cls`` is not a small integer >= 0 (below ``num_classes``, if given)."""
        if "label" not in self.members:
            return self.ordinal
        try:
            return parse_label(self.members["label"][1], num_classes)
        except ValueError as err:
            raise BadItem(self.name, str(err)) from None


MAX_LABEL_DIGITS = 9  # a class index; anything longer is not one (and int() of 5000 digits is slow or refused)
MAX_LABEL_BYTES = MAX_LABEL_DIGITS + 64  # the digits and white space around them (a line break, padding)


def parse_label(data: bytes, num_classes: int | None = None) -> int:
    """The class index in a ``label.cls`` member (ASCII digits, white space around them allowed); else ValueError."""
    text = data.strip() if len(data) <= MAX_LABEL_BYTES else b""
    if not (0 < len(text) <= MAX_LABEL_DIGITS and text.isascii() and text.isdigit()):
        raise ValueError(f"label.cls: expected a class index (a small integer >= 0), got {data[:20]!r}")
    label = int(text)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"label.cls: class {label}, but index.json names {num_classes} classes")
    return label


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, tuple[str, bytes]], str | None]]:
    """``(key, {column: (ext, bytes)}, problem)`` for each sample of one tar shard, in order, member by member.

    A member that is sparse or larger than :func:`~bind.safe_io.max_member_bytes` is not read (its header may
    promise any size): its sample comes with ``problem`` saying why, to be skipped as a bad item."""
    limit = max_member_bytes()
    key, members, problem = None, {}, None
    # random access, not the stream mode ("r|"): a stream skips a member's data by reading it block by block, so a
    # header claiming exabytes would take forever to skip; here a skip is one seek (past the end: the tar ends)
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            slash = member.name.rfind("/")
            dot = member.name.find(".", slash + 1)
            if dot < 0:
                continue
            if member.name[:dot] != key and key is not None:
                yield key, members, problem
                members, problem = {}, None
            key = member.name[:dot]
            column, _, ext = member.name[dot + 1 :].partition(".")
            refused = member_problem(member, limit)
            if refused is None:
                try:
                    members[column] = (ext, read_member(tar.extractfile(member), member.name, limit))
                except ValueError as err:
                    refused = str(err)
            problem = problem or refused
    if key is not None:
        yield key, members, problem


# ---- map-style view (recipes: source: shards) --------------------------------------------------------
@register_dataset("shards")
def shards(root: Path, split: str, path: str, column: str) -> Items:
    """One column of a shard folder as random-access :class:`Items`, for evaluation and the map-style trainer.

    Shards written for one split (``bindkit shard --split``) must match ``split``; shards of all rows
    are filtered by their ``split.txt`` as a manifest is (``*``: every row, as ``bindkit embed --shards`` reads). The shards' headers are scanned once for
    member offsets; an item is then read with one seek.
    """
    index = ShardIndex.load(Path(path) if Path(path).is_absolute() else root / path)
    index.check_column(column)
    if index.split not in (None, split) and split != "*":
        raise DataError(f"{index.directory} holds split {index.split!r}, not {split!r}; shard each split to its folder")
    places, labels, names = [], [], []
    limit = max_member_bytes()
    for shard, file in enumerate(index.files):
        path = index.directory / file
        by_key, damage = _scan_members(path, index, shard)
        # a sparse or oversized member says so (its declared size also runs past the file's end)
        damage = next((p for ms in by_key.values() for m in ms.values() if (p := member_problem(m, limit))), damage)
        if damage is not None:  # a skipped item would change what evaluation scores: refuse, naming the shard
            raise DataError(
                f"{path}: damaged tar ({damage}); reading by index (evaluation, stream: false) needs whole shards: "
                "write them again with `bindkit shard`, or train with stream: true, which skips and counts damaged samples"
            )
        with open(path, "rb") as f:
            for key, members in by_key.items():
                if split != "*" and "split" in members and _member_text(f, members["split"], path) not in (split, ""):
                    continue
                if column not in members:
                    raise DataError(f"{path}: sample {key!r} has no {column!r} member")
                m = members[column]
                places.append((shard, m.name.partition(".")[2].partition(".")[2], m.offset_data, m.size))
                labels.append(_member_label(f, members, path, key, index) if "label" in members else len(labels))
                names.append(f"{file}/{key}")

    def read(i: int) -> Any:
        shard, ext, offset, size = places[i]
        with open(index.directory / index.files[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            return decode(ext, data, names[i])
        except BadItem as err:
            raise DataError(str(err)) from None

    return Items(read, torch.tensor(labels), names, index.class_names)


shards.required_paths = lambda path, **_: [str(Path(path) / INDEX)]


def stream_summary(root: Path, split: str, path: str, column: str) -> Items:
    """What the trainer needs of streamed shards besides the stream: their size and classes, from index.json
    alone (no tar is opened; the stream reads them, skipping and counting damaged samples)."""
    index = ShardIndex.load(Path(path) if Path(path).is_absolute() else root / path)
    index.check_column(column)

    def unread(i: int) -> Any:
        raise RuntimeError(f"{index.directory}: streamed shards are read by the stream, not by index")

    return Items(unread, torch.zeros(index.samples, dtype=torch.long), None, index.class_names)


shards.stream_summary = stream_summary


def _scan_members(
    path: Path, index: ShardIndex, shard: int
) -> tuple[dict[str, dict[str, tarfile.TarInfo]], str | None]:
    """``{key: {column: member}}`` of one tar's headers, and what damage cut the scan short (None: none).

    Samples are written member after member, so in a truncated tar only the last sample seen can be
    incomplete (members or their bytes missing): it is dropped, the samples before it are kept.
    """
    by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
    damage = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (member := tar.next()) is not None:
                key, _, suffix = member.name.partition(".")
                by_key.setdefault(key, {})[suffix.partition(".")[0]] = member
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = f"{type(err).__name__}: {' '.join(str(err).split())}"
    size = path.stat().st_size
    if damage is None and len(by_key) < index.counts[shard]:  # tarfile takes a cut inside a header for the end
        damage = f"it ends early: {len(by_key)} of {index.counts[shard]} samples"
    if damage is None and any(m.offset_data + m.size > size for ms in by_key.values() for m in ms.values()):
        damage = "it ends early"
    if damage is not None and by_key:
        last = by_key[next(reversed(by_key))]
        if not set(index.columns) <= set(last) or any(m.offset_data + m.size > size for m in last.values()):
            del by_key[next(reversed(by_key))]
    return by_key, damage


def _member_bytes(f: Any, member: tarfile.TarInfo, limit: int | None = None) -> bytes:
    f.seek(member.offset_data)
    return f.read(member.size if limit is None else min(member.size, limit))


def _member_text(f: Any, member: tarfile.TarInfo, path: Path) -> str:
    """A small text member (``split.txt``), read as at most 1 KiB."""
    try:
        return _member_bytes(f, member, 1024).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: {member.name}: not UTF-8 text; expected a split name") from None


def _member_label(f: Any, members: dict[str, tarfile.TarInfo], path: Path, key: str, index: ShardIndex) -> int:
    num_classes = len(index.class_names) if index.class_names is not None else None
    try:
        return parse_label(_member_bytes(f, members["label"], MAX_LABEL_BYTES + 1), num_classes)
    except ValueError as err:  # evaluation scores against labels: a wrong one is refused, not skipped
        raise DataError(f"{path}: sample {key!r}: {err}; write the shards again with `bindkit shard`") from None
