"""bindkit: bind many modality encoders into one embedding space."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .encoder import Batch, ClipBatch, ModalityEncoder, find_blocks, move_to
from .errors import BindError, ConfigError, DataError, InputError, UnknownEncoderError, UntrustedPluginError
from .losses import LossInfo, get_loss, list_losses, register_loss
from .registry import (
    EncoderInfo,
    create_encoder,
    get_encoder_info,
    list_encoders,
    list_modalities,
    load_named_plugins,
    load_plugins,
    register_encoder,
)

try:
    __version__ = _version("bindkit")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = [
    "Batch",
    "BindError",
    "ClipBatch",
    "ConfigError",
    "DataError",
    "EncoderInfo",
    "InputError",
    "LossInfo",
    "ModalityEncoder",
    "UnknownEncoderError",
    "UntrustedPluginError",
    "create_encoder",
    "find_blocks",
    "get_encoder_info",
    "get_loss",
    "list_encoders",
    "list_losses",
    "list_modalities",
    "load_named_plugins",
    "load_plugins",
    "move_to",
    "register_encoder",
    "register_loss",
]
