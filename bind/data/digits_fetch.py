"""Where the digits benchmark's files come from and how a download is checked (``bindkit data fetch digits``).

Kept exactly as ``../shared/data`` holds them: ``mnist/images-idx3-ubyte.gz`` and ``mnist/labels-idx1-ubyte.gz``,
the first 8,000 items of MNIST's test set with the IDX count rewritten to 8000, and ``fsdd/recordings/*.wav``,
FSDD v1.0.10's 2,000 recordings of george, jackson, lucas and nicolas (its other speakers are left out: the
recipes split by these four).

Verified by SHA-256 of the content, not of the download: gzip's bytes differ from one compressor to the next,
the IDX bytes do not. The golden digests come from ``../shared/data`` (the IDX files decompressed, and its
``SHA256SUMS`` for the recordings, shipped as ``fsdd_v1.0.10.sha256`` beside this module).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile
import zlib
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from ..errors import DataError
from .fetch import Fetchable, Part, register_fetchable

# torchvision's MNIST mirrors, in its order
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FSDD_MIRRORS = ("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/",)
FSDD_ARCHIVE = "v1.0.10.zip"
FSDD_MEMBERS = "free-spoken-digit-dataset-1.0.10/recordings/"  # the release archive's folder of recordings
FSDD_DIGESTS = "fsdd_v1.0.10.sha256"  # `sha256sum` lines: DIGEST  fsdd/recordings/NAME.wav
MNIST_KEPT = 8000


@lru_cache(maxsize=1)
def recording_digests() -> dict[str, str]:
    """{``fsdd/recordings/NAME.wav``: SHA-256} of the 2,000 recordings the recipes use."""
    text = files(__package__).joinpath(FSDD_DIGESTS).read_text()
    return {path: digest for digest, path in (line.split() for line in text.splitlines() if line.strip())}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class IdxPart:
    """One MNIST file: the first 8,000 items of ``t10k-*`` with the count rewritten, as ``mnist/*-ubyte.gz``."""

    def __init__(self, archive: str, kept: str, magic: int, header: int, item: int, sha256: str, what: str) -> None:
        self.archive, self.kept, self.magic, self.header, self.item = archive, kept, magic, header, item
        self.sha256, self.what = sha256, what

    def problem(self, root: Path) -> str | None:
        path = root / self.kept
        if not path.is_file():
            return f"{path} missing"
        try:
            digest = _sha256(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError, zlib.error) as err:
            return f"{path}: not a readable gzip file ({err})"
        if digest != self.sha256:
            return f"{path}: SHA-256 of its IDX content is {digest}, expected {self.sha256} ({self.what})"
        return None

    def unpack(self, download: Path) -> dict[str, bytes]:
        try:
            raw = gzip.decompress(download.read_bytes())
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{self.archive}: not a complete gzip file ({err})") from None
        magic, count = struct.unpack(">II", raw[:8]) if len(raw) >= 8 else (None, 0)
        size = self.header + MNIST_KEPT * self.item
        if magic != self.magic or count < MNIST_KEPT or len(raw) < size:
            raise DataError(
                f"{self.archive}: expected an IDX file with magic {self.magic} and at least {MNIST_KEPT} items, "
                f"got magic {magic}, {count} items, {len(raw)} bytes"
            )
        kept = struct.pack(">II", magic, MNIST_KEPT) + raw[8:size]
        if _sha256(kept) != self.sha256:
            raise DataError(
                f"{self.archive}: SHA-256 of its first {MNIST_KEPT} {self.what} is {_sha256(kept)}, expected "
                f"{self.sha256} (MNIST's test set)"
            )
        return {self.kept: gzip.compress(kept, compresslevel=6, mtime=0)}

    def part(self) -> Part:
        return Part(self.archive, (self.kept,), MNIST_MIRRORS, self.problem, self.unpack)


# SHA-256 of ../shared/data's mnist files decompressed: IDX header (count 8000) and the first 8,000 items
IMAGES = IdxPart(
    "t10k-images-idx3-ubyte.gz",
    "mnist/images-idx3-ubyte.gz",
    magic=2051,
    header=16,
    item=28 * 28,
    sha256="c6beb86dee3f4e07138a2ee7e423dbbe9f2de59e54eee6b1ede5b6b0f2ae6ebc",
    what="images",
)
LABELS = IdxPart(
    "t10k-labels-idx1-ubyte.gz",
    "mnist/labels-idx1-ubyte.gz",
    magic=2049,
    header=8,
    item=1,
    sha256="ca7bfaf2ca63bacfe71b50b711ce605e34a6556a68b2ba8a628b8559b6a9ba8d",
    what="labels",
)


def recordings_problem(root: Path) -> str | None:
    """None when all 2,000 recordings are under ``root`` with their digests (other files there are left alone)."""
    missing, differ = [], []
    for rel, digest in recording_digests().items():
        path = root / rel
        if not path.is_file():
            missing.append(rel)
        elif _sha256(path.read_bytes()) != digest:
            differ.append(rel)
    total = len(recording_digests())
    if missing:
        return (
            f"{root / 'fsdd/recordings'}: {len(missing)} of {total} recordings missing (e.g. {Path(missing[0]).name})"
        )
    if differ:
        return f"{root / differ[0]}: differs from FSDD v1.0.10 ({len(differ)} of {total} recordings do)"
    return None


def unpack_recordings(download: Path) -> dict[str, bytes]:
    """The 2,000 recordings out of FSDD's release archive, each checked against its digest."""
    kept = {}
    try:
        with zipfile.ZipFile(download) as archive:
            names = set(archive.namelist())
            for rel, digest in recording_digests().items():
                member = FSDD_MEMBERS + Path(rel).name
                if member not in names:
                    raise DataError(f"{FSDD_ARCHIVE}: {member} missing (expected FSDD v1.0.10's release archive)")
                content = archive.read(member)
                if _sha256(content) != digest:
                    raise DataError(f"{FSDD_ARCHIVE}: {member} has SHA-256 {_sha256(content)}, expected {digest}")
                kept[rel] = content
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:  # cut short, or a member's CRC fails
        raise DataError(f"{FSDD_ARCHIVE}: not a complete zip archive ({err})") from None
    return kept


DIGITS = register_fetchable(
    Fetchable(
        "digits",
        "MNIST's first 8,000 test images (CC BY-SA 3.0) and FSDD v1.0.10's 2,000 recordings of 4 speakers "
        "(CC BY-SA 4.0), as the digits recipes read them",
        (
            IMAGES.part(),
            LABELS.part(),
            Part(FSDD_ARCHIVE, ("fsdd/recordings",), FSDD_MIRRORS, recordings_problem, unpack_recordings),
        ),
    )
)
