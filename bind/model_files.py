"""A saved model's files, read as data anyone may have written: config checks, weights, paths, atomic writes.

:class:`bind.model.BindModel` saves and loads through these. Weights load only into the tensors the
config built, each checked for name, shape, dtype and finiteness; a path a config names must stay
inside the model's folder; files are written whole or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import ConfigError, DataError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_config(config: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the key when ``config`` is not a model config this bindkit reads."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object (a bindkit model config), got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(
            f"{where}: format_version: expected an integer, got {version!r}; the file was not written by bindkit"
        )
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{where}: model format_version {version} is not supported by this bindkit (reads up to "
            f"{FORMAT_VERSION}): a newer bindkit wrote it; upgrade bindkit (`pip install -U bindkit`) to load it"
        )
    encoders = config.get("encoders")
    if not isinstance(encoders, Mapping) or not encoders:
        raise ConfigError(f"{where}: encoders: expected a mapping of modality -> encoder spec, got {encoders!r}")
    for modality, spec in encoders.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where}: encoders.{modality}.name: expected an encoder name, got {spec!r}")
        if not isinstance(spec.get("kwargs", {}), Mapping):
            raise ConfigError(f"{where}: encoders.{modality}.kwargs: expected a mapping, got {spec['kwargs']!r}")
    if not isinstance(config.get("anchor_modality"), str):
        raise ConfigError(f"{where}: anchor_modality: expected a modality name, got {config.get('anchor_modality')!r}")


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


def resolve_inside(folder: Path, relative: str | os.PathLike[str], where: str, confine: Path | None = None) -> Path:
    """``folder / relative`` resolved (symlinks followed); :class:`DataError` when that leaves ``folder``.

    ``where`` names the file and key the path came from, e.g. ``"runs/x/config.json: encoders.text.kwargs.path"``.
    ``confine``: a folder holding ``folder`` that links inside it may lead to (a hub cache repository's);
    the path as written must still stay in ``folder``.
    """
    base = Path(folder).resolve()
    written = Path(os.path.normpath(base / relative))  # an absolute ``relative`` replaces base, and is refused below
    target = written.resolve()
    allowed = Path(confine).resolve() if confine is not None else base
    if not written.is_relative_to(base) or not target.is_relative_to(allowed):
        raise DataError(
            f"{where}: {os.fspath(relative)!r} resolves to {target}, outside {base}; only files inside that folder "
            "are read (the file was edited, or comes from an untrusted source)"
        )
    return target


MAX_CONFIG_BYTES = 16 << 20  # a model's config.json is a few KB (a long class list: a few hundred); more is no config


def read_bounded(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a small file anyone may have written, refused in one line past ``limit`` bytes."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ConfigError(f"{path}: larger than {limit >> 20} MiB; expected a small JSON file written by bindkit")
    return raw.decode("utf-8")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
