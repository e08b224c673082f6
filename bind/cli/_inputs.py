"""Turning command-line INPUT arguments into raw items, shared by ``embed``, ``retrieve`` and ``eval``.

Imports no torch or numpy: the checks that need no model (:func:`check_input_files`, :func:`check_device_name`,
:func:`check_file`) run before a verb loads anything heavy.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DataError, InputError
from ..inputs import glob_files, is_glob, walk_files
from ..safe_io import text_lines

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..model import BindModel

INPUTS_HELP = (
    "text: the strings themselves; other modalities: files, folders (the files of that modality in them and "
    "their subfolders), "
    "globs ('wavs/*.wav'); "
    "any modality: @LIST.txt, one item per line (file paths relative to the list's folder)"
)

MANIFEST = "a CSV or JSONL manifest of your files (one column per modality and a label column)"


def add_plugin_args(p: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (import it: the user's own consent) and ``--trust-plugins`` (import what a file names)."""
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="import MODULE to register encoders")
    p.add_argument(
        "--trust-plugins",
        action="store_true",
        help="import the plugin modules the recipe or run names (runs their code; only for files you trust)",
    )


def read_inputs(model: BindModel, modality: str, inputs: list[str]) -> list[str]:
    """Raw items of ``modality`` from INPUT arguments, in the order given (folders and globs sorted).

    Text items are the strings themselves (``@file.txt``: one text per line); what other modalities
    take is a file: a path, a folder (its files, not hidden ones), a glob, or ``@list.txt`` of paths.
    """
    check_modality(model, modality)
    is_text = bool(getattr(model[modality], "takes_text", False))
    items: list[str] = []
    for arg in inputs:
        if arg.startswith("@"):
            lines = _read_lines(Path(arg[1:]), arg)
            if is_text:
                items.extend(lines)
            else:
                base = Path(arg[1:]).parent
                items.extend(
                    _existing_file(str(base / line), modality, f"line {n} of {arg[1:]}")
                    for n, line in enumerate(lines, 1)
                )
        elif is_text:
            items.append(arg)
        else:
            items.extend(_expand(arg, modality, model[modality].file_suffixes))
    if not items:
        raise InputError(f"no {modality} inputs given; pass at least one file path (text: a string or @FILE)")
    return items


def check_modality(model: BindModel, modality: str) -> None:
    """A one-line error for a modality the model does not have (``--modality txt``)."""
    model[modality]  # raises "no modality 'txt'; did you mean 'text'? the model has: ..."


def _expand(arg: str, modality: str, suffixes: tuple[str, ...] | None) -> list[str]:
    path = Path(arg)
    if path.is_dir():
        files = walk_files(path, suffixes)
        if not files:
            kinds = f" ({', '.join(suffixes)})" if suffixes else ""
            raise DataError(f"{arg}: the folder (and its subfolders) holds no {modality} files{kinds}")
        return files
    if path.is_file():
        return [arg]
    if is_glob(arg):
        files = glob_files(arg)
        if not files:
            raise DataError(f"{arg}: no file matches this pattern; expected {modality} files")
        return files
    return [_existing_file(arg, modality, "")]


def _existing_file(arg: str, modality: str, where: str) -> str:
    if not Path(arg).is_file():
        problem = "a folder, not a file" if Path(arg).is_dir() else "file not found"
        at = f" ({where})" if where else ""
        raise DataError(f"{arg}{at}: {problem}; expected the path of an existing {modality} file")
    return arg


def check_input_files(inputs: list[str]) -> None:
    """What INPUT arguments name for certain, checked before a model loads: each ``@LIST`` file exists, is a file
    and can be opened. (Whether a plain argument is a text or a file's path depends on the model's encoder for the
    modality: :func:`read_inputs` checks those once the model is known.)"""
    for arg in inputs:
        if arg.startswith("@"):
            _check_list_file(Path(arg[1:]), arg)


def _check_list_file(path: Path, arg: str) -> None:
    if not path.is_file():
        state = "a folder, not a file" if path.is_dir() else "list file not found"
        raise DataError(f"{path}: {state} (from {arg!r}; @FILE reads one item per line)")
    with open(path, "rb"):  # unreadable (permissions): an OSError naming the file, from the CLI's boundary
        pass


def check_file(path: str | os.PathLike[str], what: str) -> None:
    """``path`` is an existing file that can be opened; else one line naming it and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        state = "a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: {state}; expected {what}")
    with open(path, "rb"):
        pass


def _read_lines(path: Path, arg: str) -> list[str]:
    """The non-blank lines of an ``@FILE`` argument."""
    _check_list_file(path, arg)
    with open(path, "rb") as f:  # line by line, each bounded: a file without line breaks is refused, not loaded
        lines = [line.strip() for line in text_lines(f, path) if line.strip()]
    if not lines:
        raise InputError(f"{path}: no items in it (from {arg!r}); expected one item per line")
    return lines


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number of items, got {batch_size}")
    return batch_size


_DEVICE = re.compile(r"auto|cpu(:0)?|cuda(:[0-9]+)?")


def check_device_name(name: str) -> None:
    """``--device`` is spelled as :func:`resolve_device` takes it (checked without torch)."""
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """``--device``: :func:`bind.distributed.resolve_device`, after the spelling is checked without torch."""
    check_device_name(name)
    from ..distributed import resolve_device

    return resolve_device(name, "--device")


def embed_inputs(
    model: BindModel, modality: str, items: list[str], batch_size: int = 64, show_progress: bool = True
) -> np.ndarray:
    """(N, D) float32 unit-norm rows in input order, with a progress bar for long inputs."""
    show = None if show_progress else False  # None: a bar when there is more than one batch
    return model.encode(modality, items, batch_size=check_batch_size(batch_size), show_progress_bar=show)
