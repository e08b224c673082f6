"""A saved model's files, read as data anyone may have written: config checks, weights, paths, atomic writes.

:class:`bind.model.BindModel` saves and loads through these. Weights load only into the tensors the
config built, each checked for name, shape, dtype and finiteness; a path a config names must stay
inside the model's folder; files are written whole or not at all.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import os
import reprlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .registry import get_encoder_info
from .safe_io import resolve_inside

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_config(config: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the key when ``config`` is not a model config this bindkit reads.

    Every key :meth:`BindModel.from_config` reads is checked here, before anything is built: its type, and each
    encoder argument against the annotation of the registered factory's parameter (``width: int`` takes no
    ``"x"``), so a stranger's config is one line naming the key rather than an error from deep in a factory."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object (a bindkit model config), got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(
            f"{where}: format_version: expected an integer, got {_shown(version)}; the file was not written by bindkit"
        )
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{where}: model format_version {version} is not supported by this bindkit (reads up to "
            f"{FORMAT_VERSION}): a newer bindkit wrote it; upgrade bindkit (`pip install -U bindkit`) to load it"
        )
    encoders = config.get("encoders")
    if not isinstance(encoders, Mapping) or not encoders:
        raise ConfigError(f"{where}: encoders: expected a mapping of modality -> encoder spec, got {_shown(encoders)}")
    dims: dict[str, int | None] = {}
    for modality, spec in encoders.items():
        at = f"{where}: encoders.{modality}"
        if not modality or not modality.isprintable():
            raise ConfigError(f"{where}: encoders: expected modality names (printable text), got {modality!r}")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{at}.name: expected an encoder name, got {_shown(spec)}")
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{at}.kwargs: expected a mapping, got {_shown(kwargs)}")
        if spec.get("freeze", "none") not in ("none", "trunk", "all"):
            raise ConfigError(f"{at}.freeze: expected 'none', 'trunk' or 'all', got {_shown(spec['freeze'])}")
        blocks = spec.get("unfreeze_last_blocks", 0)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
            raise ConfigError(f"{at}.unfreeze_last_blocks: expected an integer >= 0, got {_shown(blocks)}")
        if not isinstance(spec.get("lora", {}), (Mapping, type(None))):
            raise ConfigError(f"{at}.lora: expected a mapping or null, got {_shown(spec['lora'])}")
        if blocks and spec.get("freeze") != "trunk":
            raise ConfigError(
                f"{at}.unfreeze_last_blocks: {blocks} goes with freeze 'trunk', got freeze {_shown(spec.get('freeze'))}"
            )
        dims[modality] = _check_factory_kwargs(spec["name"], kwargs, f"{at}.kwargs")
    _check_embed_dims(config.get("embed_dim"), dims, where)
    anchor = config.get("anchor_modality")
    if not isinstance(anchor, str) or anchor not in encoders:
        raise ConfigError(f"{where}: anchor_modality: expected one of {', '.join(encoders)}, got {_shown(anchor)}")
    shared = config.get("shared_trunks", {})
    if not isinstance(shared, Mapping) or not all(
        isinstance(m, str) and isinstance(s, str) and m in encoders and s in encoders and m != s
        for m, s in shared.items()
    ):
        raise ConfigError(
            f"{where}: shared_trunks: expected a mapping of modality -> another modality of encoders, got {_shown(shared)}"
        )
    class_names = config.get("class_names")
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        raise ConfigError(f"{where}: class_names: expected a list of strings or null, got {_shown(class_names)}")
    modules = config.get("encoder_modules")
    if modules is not None and not (isinstance(modules, Mapping) and all(isinstance(v, str) for v in modules.values())):
        raise ConfigError(
            f"{where}: encoder_modules: expected a mapping of encoder -> module name, got {_shown(modules)}"
        )


def _check_factory_kwargs(name: str, kwargs: Mapping[str, Any], where: str) -> int | None:
    """Each argument of a registered factory: one it takes (one named like a path, or a mapping that may hold
    one, is confined by :func:`paths_inside` first and refused by the registry after), of its parameter's
    annotated type. Returns the ``embed_dim`` the encoder gets, when it can be told."""
    try:
        factory = get_encoder_info(name).factory
    except ConfigError:  # an unregistered encoder: from_config names it and the plugin that registers it
        return None
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params and not (key == "path" or key.endswith("_path") or isinstance(kwargs[key], Mapping)):
                raise ConfigError(
                    f"{where}.{_shown_key(key)}: encoder {name!r} takes no such argument; it takes {', '.join(params)}"
                )
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations this interpreter cannot evaluate: the factory checks its own arguments
        hints = {}
    for key, value in kwargs.items():
        tp = hints.get(key)
        if tp is not None and not _fits(value, tp):
            raise ConfigError(f"{where}.{_shown_key(key)}: expected {_expected(tp)}, got {_shown(value)}")
    dim = kwargs["embed_dim"] if "embed_dim" in kwargs else getattr(params.get("embed_dim"), "default", None)
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _check_embed_dims(declared: Any, dims: dict[str, int | None], where: str) -> None:
    """Every encoder embeds into the one space the config declares (``embed_dim``), or all into one of a size."""
    known = {m: d for m, d in dims.items() if d is not None}
    if isinstance(declared, int) and not isinstance(declared, bool):
        for modality, dim in known.items():
            if dim != declared:
                raise ConfigError(
                    f"{where}: encoders.{modality}.kwargs.embed_dim: {dim}, but the model's embed_dim is {declared}; "
                    "every encoder embeds into one space"
                )
    elif len(set(known.values())) > 1:
        raise ConfigError(f"{where}: encoders disagree on embed_dim ({known}); every encoder embeds into one space")


def _shown_key(key: str) -> str:
    return key if key.isprintable() and key and len(key) <= 60 else _shown(key)


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value can be what annotation ``tp`` asks for; annotations not understood here accept anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str or tp in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        return isinstance(value, list)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return True


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    if tp is Path or origin is os.PathLike or tp is os.PathLike:
        return "a path (text)"
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 60, 60, 2, 4, 4


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: an error quotes what it found, not a megabyte of it."""
    return _SHORT.repr(value)


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys are one tensor under several names (tied weights)."""
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def unique_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with each tied tensor kept once, under its first name (safetensors refuses aliases)."""
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for name, tensor in state.items():
        key = _tensor_key(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def load_weights(model: nn.Module, path: Path, device: str) -> None:
    """Load ``path`` into ``model`` strictly, where a tied tensor counts as loaded through any of its names.

    Each tensor is checked before anything is copied: its shape and dtype against the model built from the
    config, and its values for NaN or inf (a diverged or damaged file would give NaN embeddings, not an error).
    """
    try:
        saved = load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise DataError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt: restore it, or run again"
        ) from err
    state = model.state_dict()
    expected = unique_tensors(state)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        raise DataError(
            f"{path} does not match the model its config.json describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the directory's files come from different runs"
        )
    for name, tensor in saved.items():
        _check_tensor(path, name, tensor, state[name])
    model.load_state_dict(saved, strict=False)


_FINITE_BLOCK = 1 << 22  # elements checked at once: a bounded mask however large the tensor


def _check_tensor(path: Path, name: str, tensor: Tensor, target: Tensor) -> None:
    """Raise :class:`DataError` naming ``path`` and ``name`` when a saved tensor cannot stand in for ``target``."""
    built = f"the model built from {CONFIG_NAME} expects"
    if tensor.shape != target.shape:
        raise DataError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, {built} {tuple(target.shape)}; "
            "the directory's files come from different runs or were edited: restore them, or run again"
        )
    # A float tensor of another precision (a model saved after .half()) is cast on load, as load_state_dict does;
    # a float where an integer counter or a bool mask belongs (or the reverse) is not a model's file.
    if tensor.dtype != target.dtype and not (tensor.is_floating_point() and target.is_floating_point()):
        raise DataError(
            f"{path}: tensor {name!r} has dtype {_dtype_name(tensor)}, {built} {_dtype_name(target)}; "
            "the directory's files come from different runs or were edited: restore them, or run again"
        )
    if tensor.is_floating_point() or tensor.is_complex():
        bad = sum(int((~torch.isfinite(block)).sum()) for block in tensor.reshape(-1).split(_FINITE_BLOCK))
        if bad:
            raise DataError(
                f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the weights are "
                "damaged (or training diverged): restore the file or an earlier checkpoint, or run again"
            )


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def paths_inside(kwargs: Mapping[str, Any], root: Path, where: str, confine: Path | None = None) -> dict[str, Any]:
    """``kwargs`` with each file argument (``path``, ``*_path``, also nested) resolved inside ``root``.

    A saved model refers only to files it holds itself (``assets/<modality>``, written by
    :meth:`ModalityEncoder.export_assets`); a config.json that names ``../x``, ``/etc`` or a symlink
    leading out of ``root`` is refused rather than followed. ``confine``: where links may lead (a hub
    snapshot's files are links into its repository's cache folder); default ``root``.
    """
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            value = paths_inside(value, root, f"{where}.{key}", confine)
        elif (key == "path" or key.endswith("_path")) and isinstance(value, (str, os.PathLike)):
            value = str(resolve_inside(root, value, f"{where}.{key}", confine))
        out[key] = value
    return out
