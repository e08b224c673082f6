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

import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import TarWriter

from ..errors import DataError
from ..model import resolve_inside
from . import Items, register_dataset
from .manifest import labels_of, manifest_classes, read_manifest
from .pairs import BAD_ITEM_ERRORS, MAX_SKIP, BadItem, item_generator

log = logging.getLogger(__name__)

INDEX = "index.json"
RESERVED_COLUMNS = ("id", "label", "split")  # manifest columns that are not modalities
IMAGE_EXTS = {"png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm"}
AUDIO_EXTS = {"wav", "flac", "ogg"}
FIXED_MTIME = 0  # the same manifest gives byte-identical shards (an int: a float mtime adds a PAX header per member)


# ---- writing ----------------------------------------------------------------------------------------
def write_shards(
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    split: str | None = None,
    text_columns: Sequence[str] = ("text",),
    overwrite: bool = False,
) -> list[Path]:
    """Pack a manifest's rows into ``out_dir/shard-000000.tar ...`` and ``out_dir/index.json``.

    A sample's key is its row's 0-based position in the manifest (zero-padded), or its ``id``
    column. Each modality column is stored as the file's bytes under ``COLUMN.EXT`` (``EXT`` from
    the file name), a text column as ``COLUMN.txt``, the label's class index as ``label.cls`` and,
    with ``split=None``, the row's split as ``split.txt``. ``split`` keeps the rows of one split (and
    rows without one), as the ``manifest`` dataset does. A new shard starts after
    ``samples_per_shard`` samples or before ``max_shard_bytes`` would be passed. The shards are
    written to a temporary folder that replaces ``out_dir`` (only with ``overwrite`` if it holds files)
    once complete.

    Example::

        write_shards("pairs.csv", "shards/train", split="train")  # [shards/train/shard-000000.tar, ...]
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise DataError(f"{out_dir} already exists and is not an empty folder; pass --overwrite to replace it")
    all_rows = read_manifest(manifest_path)
    rows = [(n, r) for n, r in enumerate(all_rows) if split is None or r.get("split", split) in (split, "", None)]
    if not rows:
        raise DataError(f"manifest {manifest_path}: no rows" + (f" of split {split!r}" if split else ""))
    columns = [c for c in all_rows[0] if c not in RESERVED_COLUMNS]
    for column in columns:
        if not column or "." in column or "/" in column:
            raise DataError(f"manifest {manifest_path}: column name {column!r} must be non-empty, without '.' or '/'")
    has_label, has_split = "label" in all_rows[0], "split" in all_rows[0] and split is None
    class_names = manifest_classes(all_rows)  # every split's classes: shards of train and eval agree
    labels = labels_of([r for _, r in rows], class_names)
    keys = _keys(rows, len(all_rows), manifest_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    written: list[dict[str, Any]] = []
    extensions: dict[str, set[str]] = {c: set() for c in columns}
    writer = None
    try:
        for (n, row), key, label in zip(rows, keys, labels, strict=True):
            sample = {"__key__": key}
            for column in columns:
                value = row.get(column)
                if value in (None, ""):
                    raise DataError(f"manifest {manifest_path}: row {n + 1} has an empty {column!r}")
                if column in text_columns:
                    ext, data = "txt", str(value).encode("utf-8")
                else:
                    file = manifest_path.parent / str(value)
                    if not file.is_file():
                        raise DataError(f"manifest {manifest_path}: row {n + 1} ({column}): file {file} not found")
                    ext, data = file.suffix[1:].lower() or "bin", file.read_bytes()
                extensions[column].add(ext)
                sample[f"{column}.{ext}"] = data
            if has_label:
                sample["label.cls"] = str(label).encode()
            if has_split and row.get("split"):
                sample["split.txt"] = str(row["split"]).encode()
            size = sum(512 + len(v) for k, v in sample.items() if k != "__key__")  # + tar headers
            full = written and (
                written[-1]["samples"] == samples_per_shard
                or (max_shard_bytes and written[-1]["bytes"] + size > max_shard_bytes)
            )
            if writer is None or full:
                if writer is not None:
                    writer.close()
                written.append({"file": f"shard-{len(written):06d}.tar", "samples": 0, "bytes": 0})
                writer = TarWriter(str(tmp / written[-1]["file"]), encoder=False, mtime=FIXED_MTIME)
            writer.write(sample)
            written[-1]["samples"] += 1
            written[-1]["bytes"] += size
        writer.close()
        for shard in written:
            shard["bytes"] = (tmp / shard["file"]).stat().st_size
        index = {
            "format": "webdataset",
            "written_by": "bindkit shard",
            "manifest": str(manifest_path),
            "split": split,
            "samples": len(rows),
            "columns": {c: sorted(e) for c, e in extensions.items()},
            "text_columns": [c for c in columns if c in text_columns],
            "class_names": class_names,
            "shards": written,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():  # replace: move the old folder aside first, so a failure leaves one of the two
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d samples in %d shards to %s", len(rows), len(written), out_dir)
    return [out_dir / s["file"] for s in written]


def _keys(rows: list[tuple[int, dict[str, Any]]], total: int, manifest_path: Path) -> list[str]:
    """Sample keys: the ``id`` column, else the row number zero-padded (WebDataset keys end at the first dot)."""
    if not rows or "id" not in rows[0][1]:
        width = max(6, len(str(total - 1)))
        return [f"{n:0{width}d}" for n, _ in rows]
    keys, seen = [], {}
    for n, row in rows:
        key = str(row.get("id") or "")
        if not key or "." in key or "/" in key:
            raise DataError(
                f"manifest {manifest_path}: row {n + 1} has id {key!r}; ids must be non-empty, no '.' or '/'"
            )
        if key in seen:
            raise DataError(f"manifest {manifest_path}: rows {seen[key] + 1} and {n + 1} have the same id {key!r}")
        seen[key] = n
        keys.append(key)
    return keys


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
        try:
            raw = json.loads(file.read_text())
            index = cls(
                file.parent,
                [s["file"] for s in raw["shards"]],
                [int(s["samples"]) for s in raw["shards"]],
                dict(raw["columns"]),
                raw.get("class_names"),
                raw.get("split"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{file}: not a shard index written by `bindkit shard` ({type(err).__name__}: {err})"
            ) from err
        for i, (name, count) in enumerate(zip(index.files, index.counts, strict=True)):
            _check_shard_name(file, i, name)
            if count < 0:
                raise DataError(f"{file}: shards[{i}].samples: expected a count of samples (>= 0), got {count}")
        missing = [f for f in index.files if not (index.directory / f).is_file()]
        if missing:
            raise DataError(f"{file} lists {len(missing)} shard(s) not in {index.directory}: {', '.join(missing[:5])}")
        return index

    def check_column(self, column: str) -> None:
        if column not in self.columns:
            raise DataError(f"{self.directory / INDEX}: no column {column!r}; columns are {', '.join(self.columns)}")


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
    """One sample as read from a shard: ``members`` maps a column to its (extension, bytes)."""

    shard: str
    key: str
    ordinal: int  # position in the whole shard set (shard by shard): the index augmentation seeds on
    members: dict[str, tuple[str, bytes]]

    @property
    def name(self) -> str:
        return f"{self.shard}/{self.key}"

    def label(self) -> int:
        """The ``label.cls`` class index; without one each sample is its own class, as in a manifest."""
        return int(self.members["label"][1]) if "label" in self.members else self.ordinal


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """``(key, {column: (ext, bytes)})`` for each sample of one tar shard, in order, streaming."""
    key, members = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            slash = member.name.rfind("/")
            dot = member.name.find(".", slash + 1)
            if dot < 0:
                continue
            if member.name[:dot] != key and key is not None:
                yield key, members
                members = {}
            key = member.name[:dot]
            column, _, ext = member.name[dot + 1 :].partition(".")
            members[column] = (ext, tar.extractfile(member).read())
    if key is not None:
        yield key, members


def decode(ext: str, data: bytes, where: str) -> Any:
    """A member's bytes -> the raw item a loose file would give the encoders; raises ``BadItem``."""
    try:
        if ext in IMAGE_EXTS:
            # the pixel budget of loose image files (encoders/image.py), checked on the header before decoding
            from encoders.image import check_image_size

            with Image.open(io.BytesIO(data)) as image:
                check_image_size(image.size, f"image {where}.{ext}")
                return ImageOps.exif_transpose(image)  # a loaded copy, upright as load_image reads a file
        if ext in AUDIO_EXTS:
            wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (samples, channels)
            missing = _wav_bytes_missing(data) if ext == "wav" else 0
            if missing:
                raise ValueError(f"truncated WAV: its header promises {missing} more bytes of samples")
            return (wave[:, 0] if wave.shape[1] == 1 else np.ascontiguousarray(wave.T)), rate  # load_audio's layout
        if ext == "txt":
            return data.decode("utf-8")
        if ext == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if ext == "json":
            return json.loads(data)
        return data  # unknown formats: the encoder's preprocess gets the bytes
    except (OSError, ValueError, SyntaxError, RuntimeError, TypeError, Image.DecompressionBombError) as err:
        raise BadItem(where, f"cannot decode .{ext} ({type(err).__name__}: {err})") from err


def _wav_bytes_missing(data: bytes) -> int:
    """Bytes a RIFF/WAVE ``data`` chunk declares beyond the end (libsndfile reads a cut-off WAV silently)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    position = 12
    while position + 8 <= len(data):
        chunk, length = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if chunk == b"data":  # streaming writers leave the length 0 or 0xFFFFFFFF: unknown, not truncated
            return max(0, length - (len(data) - position - 8)) if 0 < length < 0xFFFFFFFF else 0
        position += 8 + length + (length & 1)
    return 0


def shuffled(samples: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``samples`` in a random order drawn from a buffer of ``buffer_size`` (0 or 1: in order)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """``(decoded members, label, bad)`` for each sample of this rank's share of a shard folder.

    ``decoded members`` maps each modality column to its raw item. Subclasses override :meth:`load`.
    ``shuffle=False, shuffle_buffer=0`` reads in shard order (evaluation). ``__len__`` is the
    number of samples this rank reads in the current epoch (bad ones included).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad: bool = True,
    ) -> None:
        self.index = ShardIndex.load(path)
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if len(self.index.files) < world_size:
            raise DataError(
                f"{self.index.directory}: {len(self.index.files)} shards cannot feed {world_size} ranks; "
                "rewrite with a smaller --samples-per-shard"
            )
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size, self.skip_bad, self.epoch = rank, world_size, skip_bad, 0
        self.offsets = np.concatenate([[0], np.cumsum(self.index.counts)])[:-1].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Indices of the shards one worker of this rank reads in ``epoch``."""
        order = np.arange(len(self.index.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order[self.rank :: self.world_size][worker::num_workers].tolist()

    def __len__(self) -> int:
        return sum(self.index.counts[i] for i in self.shards_for(self.epoch))

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iterate(epoch, *((info.id, info.num_workers) if info else (0, 1)))

    def iterate(self, epoch: int, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[Any, ...]]:
        """``(*load(sample), bad)`` for the samples of one worker's shards in ``epoch``."""
        bad: list[tuple[str, str]] = []
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        in_a_row = 0
        for sample in shuffled(self._read(self.shards_for(epoch, worker, num_workers), bad), self.shuffle_buffer, rng):
            try:
                out = self.load(sample, epoch)
            except BadItem as err:
                if not self.skip_bad:
                    raise (err.__cause__ or DataError(str(err))) from None
                bad.append((err.name, err.message))
                in_a_row += 1
                if in_a_row >= MAX_SKIP:
                    raise DataError(f"{MAX_SKIP} samples in a row could not be read; the last: {err}") from None
                continue
            in_a_row = 0
            yield (*out, list(bad))
            bad.clear()  # in place: _read appends to this list
        for name, message in bad:  # after the last good sample: nothing left to report them with
            log.warning("skipped bad sample %s: %s", name, message)

    def _read(self, shards: list[int], bad: list[tuple[str, str]]) -> Iterator[ShardSample]:
        for i in shards:
            file, read, error = self.index.files[i], 0, "it ends early"
            try:
                for key, members in read_shard(self.index.directory / file):
                    yield ShardSample(file, key, self.offsets[i] + read, members)
                    read += 1
            except (tarfile.TarError, OSError, EOFError) as err:
                error = f"{type(err).__name__}: {err}"
            # tarfile takes a cut inside a header for the end of the archive: the index's count catches it
            if read < self.index.counts[i]:
                message = f"damaged tar: {read} of {self.index.counts[i]} samples read ({error}); the rest was skipped"
                if not self.skip_bad:
                    raise DataError(f"{self.index.directory / file}: {message}")
                bad.append((file, message))

    def decode(self, sample: ShardSample, column: str) -> Any:
        if column not in sample.members:
            raise BadItem(sample.name, f"no {column!r} member")
        ext, data = sample.members[column]
        return decode(ext, data, sample.name)

    def prepare(
        self, sample: ShardSample, column: str, preprocess: Callable[[Any], Any], augment: Any, epoch: int
    ) -> Any:
        """``preprocess(augment(item))`` of one column, as :class:`~bind.data.pairs.Preprocessed` does."""
        item = self.decode(sample, column)
        try:
            if augment is None:
                return preprocess(item)
            g = item_generator(self.seed, epoch, sample.ordinal)
            return augment.augment_tensor(preprocess(augment.augment_raw(item, g)), g)
        except BAD_ITEM_ERRORS as err:
            raise BadItem(sample.name, f"{column}: {err}") from err

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, ...]:
        return {c: self.decode(sample, c) for c in self.index.columns}, sample.label()


class ShardPreprocessed(ShardStream):
    """``(preprocess(augment(item)), label, bad)`` for one column: a pretrain stage's samples."""

    def __init__(
        self, path: str | os.PathLike[str], column: str, preprocess: Callable[[Any], Any], augment: Any = None, **kw
    ) -> None:
        super().__init__(path, **kw)
        self.index.check_column(column)
        self.column, self.preprocess, self.augment = column, preprocess, augment

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, int]:
        return self.prepare(sample, self.column, self.preprocess, self.augment, epoch), sample.label()


class ShardPairs(ShardStream):
    """``(anchor_x, x, label, bad)``: the anchor column and another column of the same sample (``pairing: row``).

    The anchor is never augmented; a bad member on either side skips the whole sample.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        anchor_column: str,
        column: str,
        anchor_preprocess: Callable[[Any], Any],
        preprocess: Callable[[Any], Any],
        augment: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(path, **kw)
        for name in (anchor_column, column):
            self.index.check_column(name)
        self.anchor_column, self.column = anchor_column, column
        self.anchor_preprocess, self.preprocess, self.augment = anchor_preprocess, preprocess, augment

    def load(self, sample: ShardSample, epoch: int) -> tuple[Any, Any, int]:
        anchor_x = self.prepare(sample, self.anchor_column, self.anchor_preprocess, None, epoch)
        return anchor_x, self.prepare(sample, self.column, self.preprocess, self.augment, epoch), sample.label()


def collate_with_bad(collate: Callable[[list[tuple[Any, ...]]], tuple[Any, ...]]) -> Callable[[list], tuple]:
    """A collate function for stream samples: ``(*collate(samples without bad), all bad items of the batch)``."""
    return lambda batch: (*collate([s[:-1] for s in batch]), [b for s in batch for b in s[-1]])


# ---- map-style view (recipes: source: shards) --------------------------------------------------------
@register_dataset("shards")
def shards(root: Path, split: str, path: str, column: str) -> Items:
    """One column of a shard folder as random-access :class:`Items`, for evaluation and the map-style trainer.

    Shards written for one split (``bindkit shard --split``) must match ``split``; shards of all rows
    are filtered by their ``split.txt`` as a manifest is. The shards' headers are scanned once for
    member offsets; an item is then read with one seek.
    """
    index = ShardIndex.load(Path(path) if Path(path).is_absolute() else root / path)
    index.check_column(column)
    if index.split not in (None, split):
        raise DataError(f"{index.directory} holds split {index.split!r}, not {split!r}; shard each split to its folder")
    places, labels, names = [], [], []
    for shard, file in enumerate(index.files):
        path = index.directory / file
        by_key, damage = _scan_members(path, index, shard)
        if damage is not None:  # a skipped item would change what evaluation scores: refuse, naming the shard
            raise DataError(
                f"{path}: damaged tar ({damage}); reading by index (evaluation, stream: false) needs whole shards: "
                "write them again with `bindkit shard`, or train with stream: true, which skips and counts damaged samples"
            )
        with open(path, "rb") as f:
            for key, members in by_key.items():
                if "split" in members and _member_bytes(f, members["split"]).decode() not in (split, ""):
                    continue
                if column not in members:
                    raise DataError(f"{path}: sample {key!r} has no {column!r} member")
                m = members[column]
                places.append((shard, m.name.partition(".")[2].partition(".")[2], m.offset_data, m.size))
                labels.append(int(_member_bytes(f, members["label"])) if "label" in members else len(labels))
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
        with tarfile.open(path) as tar:
            while (member := tar.next()) is not None:
                key, _, suffix = member.name.partition(".")
                by_key.setdefault(key, {})[suffix.partition(".")[0]] = member
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = f"{type(err).__name__}: {err}"
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


def _member_bytes(f: Any, member: tarfile.TarInfo) -> bytes:
    f.seek(member.offset_data)
    return f.read(member.size)
