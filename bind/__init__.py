"""bindkit: bind many modality encoders into one embedding space."""

from .encoder import Batch, ClipBatch, ModalityEncoder, find_blocks, move_to
from .errors import BindError, ConfigError, DataError, InputError, UnknownEncoderError
from .registry import (
    EncoderInfo,
    create_encoder,
    get_encoder_info,
    list_encoders,
    list_modalities,
    load_plugins,
    register_encoder,
)

__all__ = [
    "Batch",
    "BindError",
    "ClipBatch",
    "ConfigError",
    "DataError",
    "EncoderInfo",
    "InputError",
    "ModalityEncoder",
    "UnknownEncoderError",
    "create_encoder",
    "find_blocks",
    "get_encoder_info",
    "list_encoders",
    "list_modalities",
    "load_plugins",
    "move_to",
    "register_encoder",
]
