"""What a shard member's bytes decode to: the raw item a loose file of that type gives an encoder.

Decoders are registered by file extension. The core knows only the formats that belong to no
modality (``.txt`` to ``str``, ``.npy`` to an array, ``.json``); encoders register theirs next to
their file readers (``encoders/image_io.py``: PNG, JPEG, ...; ``encoders/audio_io.py``: WAV, FLAC, OGG),
and a plugin registers any other the same way::

    from bind.data.decoders import register_decoder

    @register_decoder("ply")
    def point_cloud(data: bytes, where: str) -> np.ndarray:
        ...  # raise ValueError (or OSError) on bytes that are not a point cloud

A member with no decoder reaches the encoder's ``preprocess`` as its bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..registry import load_plugins
from ..safe_io import parse_json
from .pairs import BadItem

Decoder = Callable[[bytes, str], Any]  # (the member's bytes, its name for messages) -> raw item
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, TypeError, EOFError)  # what bad bytes raise

_DECODERS: dict[str, Decoder] = {}


def register_decoder(*extensions: str) -> Callable[[Decoder], Decoder]:
    """Register ``decoder`` for members whose name ends in one of ``extensions`` (without the dot, any case)."""

    def decorator(decoder: Decoder) -> Decoder:
        for ext in extensions:
            _DECODERS[ext.lower().lstrip(".")] = decoder
        return decoder

    return decorator


def decode(ext: str, data: bytes, where: str) -> Any:
    """A member's bytes -> the raw item a loose file would give the encoders; raises :class:`BadItem`."""
    decoder = _DECODERS.get(ext.lower())
    if decoder is None:  # encoders register theirs on import: load them once (a DataLoader worker too)
        load_plugins()
        decoder = _DECODERS.get(ext.lower())
    if decoder is None:
        return data  # unknown formats: the encoder's preprocess gets the bytes
    try:
        return decoder(data, f"{where}.{ext}")
    except DECODE_ERRORS as err:
        raise BadItem(where, f"cannot decode .{ext} ({type(err).__name__}: {err})") from err


@register_decoder("txt")
def _text(data: bytes, where: str) -> str:
    return data.decode("utf-8")


@register_decoder("npy")
def _array(data: bytes, where: str) -> np.ndarray:
    """An ``.npy`` member; its header's shape must fit the bytes it holds (numpy allocates the declared shape
    before reading a file object's data: a 100-byte member claiming a terabyte would be a MemoryError)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # 3.0 (UTF-8 field names) and later: bindkit writes none; refuse rather than trust the header
        raise ValueError(f".npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
    declared = math.prod(shape) * dtype.itemsize
    if declared > len(data) - f.tell():
        raise ValueError(f"the header declares {shape} {dtype} ({declared} bytes), the member holds {len(data)}")
    return np.load(io.BytesIO(data), allow_pickle=False)


@register_decoder("json")
def _json(data: bytes, where: str) -> Any:
    return parse_json(data, where, "a JSON document", error=ValueError)
