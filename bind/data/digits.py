"""The digits benchmark: MNIST images, spoken digits (FSDD), digit captions and moving-digit videos.

Four modalities share one concept, the digit, so items pair by label. Splits never share items:
images 0-5999 train and 6000-7999 evaluate; audio trains on three speakers and evaluates on the
fourth (a voice never heard); videos are made from the images of their split; evaluation captions
use wordings never seen in training.
"""

from __future__ import annotations

import gzip
import inspect
import io
import re
import struct
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .datasets import Items, register_dataset

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas"]
TRAIN_TEMPLATES = [
    "a handwritten {}",
    "the digit {}",
    "a drawing of the number {}",
    "someone wrote a {}",
    "the number {}",
    "a {} written by hand",
    "a picture of a {}",
    "{}",
]
EVAL_TEMPLATES = ["a photo of the digit {}", "an image of a handwritten {}", "the numeral {}"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): uint8 images (N, rows, cols) or labels (N,)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        magic, count = struct.unpack(">II", raw[:8])
        if magic == 2051:
            rows, cols = struct.unpack(">II", raw[8:16])
            return np.frombuffer(raw, np.uint8, count * rows * cols, offset=16).reshape(count, rows, cols).copy()
        if magic == 2049:
            return np.frombuffer(raw, np.uint8, count, offset=8).copy()
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise DataError(f"{path}: not a readable IDX file ({err})") from err
    raise DataError(f"{path}: IDX magic number {magic} is neither 2051 (images) nor 2049 (labels)")


@lru_cache(maxsize=4)
def _mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_idx(root / "mnist" / "images-idx3-ubyte.gz"), read_idx(root / "mnist" / "labels-idx1-ubyte.gz")


MNIST_SPLITS = {"train": (0, 6000), "eval": (6000, 8000)}


def _split_range(split: str, ranges: dict[str, tuple[int, int]]) -> range:
    if split not in ranges:
        raise DataError(f"split {split!r} unknown; expected one of {', '.join(ranges)}")
    return range(*ranges[split])


@register_dataset("mnist")
def mnist(root: Path, split: str, limit: int | None = None) -> Items:
    """MNIST digits as uint8 (28, 28) arrays; ``limit`` keeps the first N of the split."""
    images, labels = _mnist(root)
    idx = list(_split_range(split, MNIST_SPLITS))[:limit]
    return Items([images[i] for i in idx], labels[idx], [f"mnist/{i}" for i in idx], DIGIT_WORDS)


mnist.required_paths = lambda **_: ["mnist/images-idx3-ubyte.gz", "mnist/labels-idx1-ubyte.gz"]
mnist.splits = tuple(MNIST_SPLITS)
mnist.fetch = "digits"  # bindkit data fetch digits downloads what required_paths names (bind/data/digits_fetch.py)

_FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def parse_fsdd_name(path: Path) -> tuple[int, str, int]:
    """``7_jackson_12.wav`` -> (7, "jackson", 12)."""
    match = _FSDD_NAME.match(path.name)
    if not match:
        raise DataError(f"{path}: FSDD files are named DIGIT_SPEAKER_INDEX.wav")
    return int(match[1]), match[2], int(match[3])


@register_dataset("fsdd")
def fsdd(
    root: Path, split: str, eval_speakers: tuple[str, ...] | list[str] = ("nicolas",), limit: int | None = None
) -> Items:
    """Spoken digits as ``(waveform float32, sample_rate)``; ``eval`` holds the ``eval_speakers``, ``train`` the rest."""
    folder = root / "fsdd" / "recordings"
    files = sorted(folder.glob("*.wav"))
    if not files:
        raise DataError(f"{folder}: no .wav files found (expected FSDD recordings DIGIT_SPEAKER_INDEX.wav)")
    if split not in ("train", "eval"):
        raise DataError(f"fsdd split {split!r} unknown; expected 'train' or 'eval'")
    unknown = set(eval_speakers) - {parse_fsdd_name(f)[1] for f in files}
    if unknown:
        raise DataError(f"fsdd eval_speakers {sorted(unknown)} not found in {folder}")
    chosen = [f for f in files if (parse_fsdd_name(f)[1] in eval_speakers) == (split == "eval")][:limit]
    import soundfile  # the recordings' reader, only when they are read

    items = []
    for f in chosen:
        try:
            wave, rate = soundfile.read(f, dtype="float32", always_2d=False)
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise DataError(f"{f}: unreadable WAV ({err})") from err
        items.append((wave, rate))
    return Items(items, [parse_fsdd_name(f)[0] for f in chosen], [f"fsdd/{f.name}" for f in chosen], DIGIT_WORDS)


fsdd.required_paths = lambda **_: ["fsdd/recordings"]
fsdd.splits = ("train", "eval")
fsdd.fetch = "digits"


@register_dataset("digit_captions")
def digit_captions(root: Path, split: str, templates: list[str] | None = None, numerals: bool = True) -> Items:
    """Captions of the ten digits; ``train`` and ``eval`` use different wordings unless ``templates`` is given."""
    templates = templates or (TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES)
    texts, labels = [], []
    for digit, word in enumerate(DIGIT_WORDS):
        for template in templates:
            for form in [word, str(digit)] if numerals and split == "train" else [word]:
                texts.append(template.format(form))
                labels.append(digit)
    return Items(texts, labels, texts, DIGIT_WORDS)


digit_captions.splits = ("train", "eval")


def moving_digit(image: np.ndarray, num_frames: int, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """A Moving-MNIST clip: the digit slides in a straight line, bouncing off the canvas edges."""
    h, w = image.shape
    span = canvas - h
    pos = rng.uniform(0, span, size=2)
    velocity = rng.uniform(-1, 1, size=2)
    velocity *= rng.uniform(2.0, 4.0) / (np.linalg.norm(velocity) + 1e-6)
    frames = np.zeros((num_frames, canvas, canvas), np.uint8)
    for t in range(num_frames):
        for axis in range(2):  # bounce
            if not 0 <= pos[axis] + velocity[axis] <= span:
                velocity[axis] = -velocity[axis]
            pos[axis] += velocity[axis]
        y, x = int(round(pos[0])), int(round(pos[1]))
        frames[t, y : y + h, x : x + w] = np.maximum(frames[t, y : y + h, x : x + w], image)
    return frames


def _check_when_loaded(builder: Any, check: Any) -> None:
    """``builder.check``: ``check(name, ...)`` on the builder's arguments, defaults filled in, when a recipe is
    loaded (an eval set is built only after training: a bad argument must not wait for it)."""
    signature, wanted = inspect.signature(builder), list(inspect.signature(check).parameters)[1:]

    def run(root: Path, split: str, **args: Any) -> None:
        bound = signature.bind(root, split, **args)
        bound.apply_defaults()
        check(builder.__name__, *(bound.arguments[name] for name in wanted))

    builder.check = run


def _check_moving(name: str, num_frames: Any, canvas: Any) -> None:
    for key, value, low, high in (("num_frames", num_frames, 8, 64), ("canvas", canvas, 28, 1024)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise DataError(f"{name}: {key} must be an integer in {low}..{high}, got {value!r}")


@register_dataset("moving_digits")
def moving_digits(
    root: Path, split: str, num_frames: int = 8, canvas: int = 36, seed: int = 0, limit: int | None = None
) -> Items:
    """Moving-digit videos (uint8 (T, canvas, canvas)) made on the fly from the MNIST images of ``split``."""
    _check_moving("moving_digits", num_frames, canvas)
    images, labels = _mnist(root)
    idx = list(_split_range(split, MNIST_SPLITS))[:limit]

    def make(i: int) -> np.ndarray:  # the same video for the same index and seed, in any worker
        return moving_digit(images[idx[i]], num_frames, canvas, np.random.default_rng([seed, idx[i]]))

    return Items(make, labels[idx], [f"moving_digits/{i}" for i in idx], DIGIT_WORDS)


moving_digits.required_paths = mnist.required_paths
moving_digits.splits = tuple(MNIST_SPLITS)
moving_digits.fetch = "digits"
_check_when_loaded(moving_digits, _check_moving)


def _draw_range(rng: np.random.Generator, value: list[float] | tuple[float, float] | float) -> float:
    return float(rng.uniform(*value)) if isinstance(value, (list, tuple)) else float(value)


def _range(name: str, key: str, value: Any, low: float, high: float, integer: bool = False) -> tuple[float, float]:
    """A builder argument given as one number or a ``[low, high]`` pair within ``[low, high]``, as a pair."""
    kinds = (int,) if integer else (int, float)
    pair = value if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in pair):
        kind = "an integer" if integer else "a number"
        raise DataError(f"{name}: {key} must be {kind} or a range [low, high] of them, got {value!r}")
    if not low <= pair[0] <= pair[1] <= high:
        raise DataError(f"{name}: {key} must lie in {low:g}..{high:g} (a range low to high), got {value!r}")
    return pair[0], pair[1]


def _check_rescaled(name: str, canvas: Any, height: Any) -> None:
    _range(name, "canvas", canvas, 16, 1024, integer=True)
    _range(name, "height (the digit's, over the frame's)", height, 0.1, 1.0)


def _check_image_set(name: str, canvas: Any, height: Any, image_format: Any) -> None:
    _check_rescaled(name, canvas, height)
    if image_format not in ("png", "jpeg"):
        raise DataError(f"{name}: image_format must be 'png' or 'jpeg', got {image_format!r}")


def fit_digit(image: np.ndarray, canvas: int, height: float) -> np.ndarray:
    """The digit cropped to its ink and resized (bicubic, by PIL) to ``height`` x ``canvas`` pixels tall."""
    from PIL import Image

    rows, cols = np.nonzero(image > 0)
    glyph = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] if len(rows) else image
    target_h = max(2, round(height * canvas))
    target_w = min(canvas, max(1, round(glyph.shape[1] * target_h / glyph.shape[0])))
    return np.asarray(Image.fromarray(glyph).resize((target_w, target_h), Image.Resampling.BICUBIC))


@register_dataset("mnist_rescaled")
def mnist_rescaled(
    root: Path,
    split: str,
    canvas: list[int] | int = (28, 128),
    height: list[float] | float = (0.35, 1.0),
    image_format: str = "png",
    seed: int = 0,
    limit: int | None = None,
) -> Items:
    """MNIST digits drawn again at other sizes, as other programs' files are: each on a black square canvas of a
    random side in ``canvas`` pixels, its ink ``height`` of the frame tall at a random place, saved as a PNG (or
    JPEG) and read back. Tests whether the image tower learned the digit or MNIST's framing."""
    from PIL import Image  # only the rescaled sets draw and save with it (here and in fit_digit)

    _check_image_set("mnist_rescaled", canvas, height, image_format)
    images, labels = _mnist(root)
    idx = list(_split_range(split, MNIST_SPLITS))[:limit]

    def make(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, idx[i], 1])
        side = round(_draw_range(rng, canvas))
        glyph = fit_digit(images[idx[i]], side, _draw_range(rng, height))
        frame = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side - glyph.shape[0] + 1), rng.integers(0, side - glyph.shape[1] + 1)
        frame[y : y + glyph.shape[0], x : x + glyph.shape[1]] = glyph
        file = io.BytesIO()
        Image.fromarray(frame).save(file, format=image_format, **({"quality": 90} if image_format == "jpeg" else {}))
        return np.asarray(Image.open(io.BytesIO(file.getvalue())).convert("L"))

    return Items(make, labels[idx], [f"mnist_rescaled/{i}.{image_format}" for i in idx], DIGIT_WORDS)


mnist_rescaled.required_paths = mnist.required_paths
mnist_rescaled.splits = tuple(MNIST_SPLITS)
mnist_rescaled.fetch = "digits"
_check_when_loaded(mnist_rescaled, _check_image_set)


def _check_mp4(name: str, canvas: Any, height: Any, num_frames: Any, fps: Any) -> tuple[int, int]:
    _check_rescaled(name, canvas, height)
    _range(name, "fps", fps, 1, 240)
    return _range(name, "num_frames", num_frames, 1, 256, integer=True)


@register_dataset("moving_digits_mp4")
def moving_digits_mp4(
    root: Path,
    split: str,
    canvas: list[int] | int = (28, 128),
    height: list[float] | float = (0.35, 1.0),
    num_frames: list[int] | int = (8, 32),
    fps: list[float] | float = (6.0, 30.0),
    seed: int = 0,
    limit: int | None = None,
) -> Items:
    """Moving digits as a camera and an encoder would hand them over: each clip on a square canvas of a random
    side in ``canvas`` (even: H.264 needs it), the digit's ink ``height`` of the frame tall, ``num_frames`` frames
    at ``fps`` frames per second moving at 0.2-0.6 frame heights a second, encoded to H.264 (yuv420p, FFmpeg's
    default) in an mp4 container and decoded back to RGB frames (T, H, W, 3)."""
    frames_low, frames_high = _check_mp4("moving_digits_mp4", canvas, height, num_frames, fps)
    images, labels = _mnist(root)
    idx = list(_split_range(split, MNIST_SPLITS))[:limit]

    def make(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, idx[i], 2])
        side = round(_draw_range(rng, canvas)) // 2 * 2
        glyph = fit_digit(images[idx[i]], side, _draw_range(rng, height))
        count = int(rng.integers(frames_low, frames_high + 1))
        rate = _draw_range(rng, fps)
        room = np.array([side - glyph.shape[0], side - glyph.shape[1]], float)
        pos = rng.uniform(0, 1, 2) * room
        velocity = rng.normal(size=2)
        velocity *= rng.uniform(0.2, 0.6) * side / rate / (np.linalg.norm(velocity) + 1e-9)
        frames = np.zeros((count, side, side), np.uint8)
        for t in range(count):
            y, x = np.round(pos).astype(int)
            frames[t, y : y + glyph.shape[0], x : x + glyph.shape[1]] = glyph
            pos += velocity
            for axis in range(2):  # bounce off the edges
                if not 0 <= pos[axis] <= room[axis]:
                    velocity[axis] = -velocity[axis]
                    pos[axis] = np.clip(pos[axis], 0, room[axis])
        return h264_round_trip(frames, rate)

    return Items(make, labels[idx], [f"moving_digits_mp4/{i}.mp4" for i in idx], DIGIT_WORDS)


moving_digits_mp4.required_paths = mnist.required_paths
moving_digits_mp4.splits = tuple(MNIST_SPLITS)
moving_digits_mp4.fetch = "digits"
_check_when_loaded(moving_digits_mp4, _check_mp4)


def h264_round_trip(frames: np.ndarray, fps: float) -> np.ndarray:
    """Grayscale uint8 frames (T, H, W) -> an H.264 yuv420p mp4 in memory -> decoded RGB frames (T, H, W, 3)."""
    import av  # only these datasets need it

    file = io.BytesIO()
    with av.open(file, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    file.seek(0)
    with av.open(file, mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
