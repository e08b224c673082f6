"""``bindkit bench data``: training pairs per second from WebDataset shards against the same items as loose files.

Both sides are built from the real digits data in a temporary folder: ``samples`` MNIST digits
saved as PNG files, each paired with an FSDD recording of the same digit (its own WAV copy), a
manifest of ``image,audio,label`` rows, and shards written from that manifest. Each side is read
in full through a DataLoader with the same batch size and workers (the best of ``repeats`` passes),
in two modes: reading and decoding only, and with the encoders' ``preprocess`` (``digits_cnn``,
``audio_cnn``) as a bind stage with ``pairing: row`` would. Loose files go through ``AnchorPairs``
with an ``EpochSampler`` (random access, two opens per pair), shards through ``ShardPairs``
(sequential reads, a shuffle buffer). The files were just written, so the page cache is warm: the
figures are the CPU cost of reading; on network or object storage, where each open is a round
trip, loose files fall further behind.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data import resolve_data_root
from ..data.decoders import decode
from ..data.digits import mnist, parse_fsdd_name
from ..data.manifest import manifest
from ..data.pairs import AnchorPairs, EpochSampler, Preprocessed
from ..data.shard_stream import ShardPairs, collate_with_bad
from ..data.shard_writer import write_shards
from ..errors import ConfigError, DataError
from ..registry import create_encoder


def bench_data(
    samples: int = 2000,
    batch_size: int = 64,
    num_workers: int = 2,
    samples_per_shard: int = 250,
    shuffle_buffer: int = 500,
    repeats: int = 2,
    seed: int = 0,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Full passes over ``samples`` image-audio pairs, from shards and from loose files: the best, in samples/s."""
    root = resolve_data_root(data_root)
    digits = mnist(root, "train", limit=samples)
    if len(digits) < samples:
        raise ConfigError(f"bench data: samples={samples} is more than the {len(digits)} MNIST training digits")
    recordings: dict[int, list[Path]] = {d: [] for d in range(10)}
    for path in sorted((root / "fsdd" / "recordings").glob("*.wav")):
        recordings[parse_fsdd_name(path)[0]].append(path)
    if not all(recordings.values()):
        raise DataError(f"{root / 'fsdd' / 'recordings'}: expected FSDD recordings of all ten digits")

    image_encoder = create_encoder("digits_cnn", embed_dim=16, width=4)
    audio_encoder = create_encoder("audio_cnn", embed_dim=16, width=4, depth=2)
    with tempfile.TemporaryDirectory(prefix="bindkit-bench-data-") as tmp:
        folder = Path(tmp)
        (folder / "image").mkdir()
        (folder / "audio").mkdir()
        with open(folder / "pairs.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "audio", "label"])
            for i in range(samples):
                label = int(digits.labels[i])
                Image.fromarray(digits[i]).save(folder / f"image/{i:05d}.png")
                shutil.copyfile(recordings[label][i % len(recordings[label])], folder / f"audio/{i:05d}.wav")
                writer.writerow([f"image/{i:05d}.png", f"audio/{i:05d}.wav", label])
        start = time.perf_counter()
        shards = write_shards(folder / "pairs.csv", folder / "shards", samples_per_shard)
        write_s = time.perf_counter() - start
        loose = [p.stat() for kind in ("image", "audio") for p in (folder / kind).iterdir()]

        def loose_pairs(anchor_fn: Callable[[Any], Any], fn: Callable[[Any], Any]) -> AnchorPairs:
            images = manifest(folder, "train", path="pairs.csv", column="image")
            audio = manifest(folder, "train", path="pairs.csv", column="audio")
            return AnchorPairs(Preprocessed(images, anchor_fn), Preprocessed(audio, fn), "row")

        def shard_pairs(anchor_fn: Callable[[Any], Any], fn: Callable[[Any], Any]) -> ShardPairs:
            return ShardPairs(
                folder / "shards", "image", "audio", anchor_fn, fn, shuffle_buffer=shuffle_buffer, seed=seed
            )

        def pair_collate(batch: list) -> tuple:
            return (
                image_encoder.collate([b[0] for b in batch]),
                audio_encoder.collate([b[1] for b in batch]),
                torch.tensor([b[2] for b in batch]),
            )

        def sizes(batch: list) -> tuple:  # decoding only: nothing but sizes crosses from the workers
            return (
                torch.tensor([b[0] for b in batch]),
                torch.tensor([b[1] for b in batch]),
                torch.tensor([b[2] for b in batch]),
            )

        def read_file(path: str) -> Any:
            return decode(Path(path).suffix[1:], Path(path).read_bytes(), path)

        # warm up what both sides share (mel filterbanks, resampling kernels) before the workers fork
        audio_encoder.preprocess(str(folder / "audio/00000.wav"))
        image_encoder.preprocess(str(folder / "image/00000.png"))
        datasets = {
            "loose_decode": (loose_pairs(lambda p: _size(read_file(p)), lambda p: _size(read_file(p))), sizes),
            "shards_decode": (shard_pairs(_size, _size), sizes),
            "loose": (loose_pairs(image_encoder.preprocess, audio_encoder.preprocess), pair_collate),
            "shards": (shard_pairs(image_encoder.preprocess, audio_encoder.preprocess), pair_collate),
        }
        # the best of `repeats` passes, taken in turns so that a busy moment on the machine hits both sides
        passes = {name: (0, float("inf")) for name in datasets}
        for _ in range(repeats):
            for name, (dataset, collate) in datasets.items():
                count, seconds = _pass(dataset, collate, batch_size, num_workers, seed)
                passes[name] = (count, min(seconds, passes[name][1]))
        shard_bytes = sum(p.stat().st_size for p in shards)
    for name, (count, _) in passes.items():
        if count != samples:
            raise DataError(f"bench data: the {name} pass read {count} of {samples} samples")
    rate = {name: samples / seconds for name, (_, seconds) in passes.items()}
    return {
        "samples": samples,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "shards": len(shards),
        "samples_per_shard": samples_per_shard,
        "shuffle_buffer": shuffle_buffer,
        "repeats": repeats,
        "loose_files": 2 * samples,
        "loose_bytes": sum(st.st_size for st in loose),
        "loose_disk_bytes": sum(st.st_blocks * 512 for st in loose),  # whole filesystem blocks per file
        "shard_bytes": shard_bytes,
        "write_shards_s": write_s,
        "shards_decode_samples_per_s": rate["shards_decode"],
        "loose_decode_samples_per_s": rate["loose_decode"],
        "decode_speedup": rate["shards_decode"] / rate["loose_decode"],
        "shards_samples_per_s": rate["shards"],
        "loose_samples_per_s": rate["loose"],
        "speedup": rate["shards"] / rate["loose"],
        "note": "page cache warm (files just written): CPU cost of reading, not disk or network latency",
    }


def _size(item: Any) -> int:
    """Pixels of an image, samples of a ``(waveform, rate)``: proof the item was decoded, cheap to send."""
    return item.width * item.height if isinstance(item, Image.Image) else int(np.asarray(item[0]).shape[-1])


def _pass(dataset: Any, collate: Callable, batch_size: int, num_workers: int, seed: int) -> tuple[int, float]:
    """Samples read and seconds taken by one full pass (worker start-up included, as each epoch pays it)."""
    start = time.perf_counter()
    if isinstance(dataset, ShardPairs):
        loader = DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=collate_with_bad(collate))
    else:
        sampler = EpochSampler(len(dataset), seed, batch_size)
        loader = DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=num_workers, collate_fn=lambda b: (*collate(b), [])
        )
    count = sum(len(labels) for _, _, labels, _ in loader)
    return count, time.perf_counter() - start
