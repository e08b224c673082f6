"""bindkit: bind many modality encoders into one embedding space.

Using a space::

    from bind import BindModel, SearchIndex
    model = BindModel.from_pretrained("runs/digits")      # a run, a saved folder or a hub id
    z = model.encode("image", ["seven.png"])              # (1, D) float32, unit norm

Training one::

    from bind import load_recipe, run_recipe
    results = run_recipe(load_recipe("recipes/digits.yaml"), "runs/digits")

Adding a modality (the plugin surface: what ``encoders/`` itself imports): :class:`ModalityEncoder`,
:func:`register_encoder`, :func:`build_head`, :class:`ClipBatch`, :class:`FileArg`, :func:`register_decoder`,
:func:`register_loss`, :class:`Items` with :func:`register_dataset` (a data set by name), :func:`positive_env` (a
size limit a user may raise through the environment, as bindkit's own file readers take theirs) and the errors.

Every name here is imported on first use, so ``import bind`` (and ``bindkit --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("bindkit")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # using and training a model
    "BindModel": "bind.model",
    "load_run": "bind.runs",
    "SearchIndex": "bind.retrieval",
    "evaluate_model": "bind.evaluate",
    "load_recipe": "bind.recipe",
    "parse_recipe": "bind.recipe",
    "Recipe": "bind.recipe",
    "run_recipe": "bind.train.trainer",
    "build_model": "bind.train.trainer",
    # losses
    "info_nce": "bind.losses",
    "label_aware_info_nce": "bind.losses",
    "supcon_loss": "bind.losses",
    "pairwise_cosine_loss": "bind.losses",
    "LossInfo": "bind.losses",
    "get_loss": "bind.losses",
    "list_losses": "bind.losses",
    "register_loss": "bind.losses",
    # the plugin surface
    "Batch": "bind.encoder",
    "ClipBatch": "bind.encoder",
    "HeadKind": "bind.encoder",
    "ModalityEncoder": "bind.encoder",
    "build_head": "bind.encoder",
    "find_blocks": "bind.encoder",
    "move_to": "bind.encoder",
    "EncoderInfo": "bind.registry",
    "FileArg": "bind.registry",
    "create_encoder": "bind.registry",
    "get_encoder_info": "bind.registry",
    "list_encoders": "bind.registry",
    "list_modalities": "bind.registry",
    "load_named_plugins": "bind.registry",
    "load_plugins": "bind.registry",
    "register_encoder": "bind.registry",
    "register_decoder": "bind.data.decoders",
    "Items": "bind.data",
    "register_dataset": "bind.data",
    "resolve_data_root": "bind.data",
    "positive_env": "bind.safe_io",
    # errors
    "BindError": "bind.errors",
    "ConfigError": "bind.errors",
    "DataError": "bind.errors",
    "InputError": "bind.errors",
    "UnknownEncoderError": "bind.errors",
    "UntrustedPluginError": "bind.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bind' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and editors see
    from .data import Items, register_dataset, resolve_data_root
    from .data.decoders import register_decoder
    from .encoder import Batch, ClipBatch, HeadKind, ModalityEncoder, build_head, find_blocks, move_to
    from .errors import BindError, ConfigError, DataError, InputError, UnknownEncoderError, UntrustedPluginError
    from .evaluate import evaluate_model
    from .losses import (
        LossInfo,
        get_loss,
        info_nce,
        label_aware_info_nce,
        list_losses,
        pairwise_cosine_loss,
        register_loss,
        supcon_loss,
    )
    from .model import BindModel
    from .recipe import Recipe, load_recipe, parse_recipe
    from .registry import (
        EncoderInfo,
        FileArg,
        create_encoder,
        get_encoder_info,
        list_encoders,
        list_modalities,
        load_named_plugins,
        load_plugins,
        register_encoder,
    )
    from .retrieval import SearchIndex
    from .runs import load_run
    from .safe_io import positive_env
    from .train.trainer import build_model, run_recipe
