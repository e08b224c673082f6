"""Turning command-line INPUT arguments into raw items, shared by ``embed`` and ``retrieve``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError, InputError
from ..model import BindModel


def read_inputs(modality: str, inputs: list[str]) -> list[str]:
    """Text: the strings themselves, ``@file.txt`` one per line. Other modalities: existing file paths."""
    items: list[str] = []
    for arg in inputs:
        if modality == "text":
            if arg.startswith("@"):
                items.extend(_read_lines(Path(arg[1:]), arg))
            else:
                items.append(arg)
        else:
            if not Path(arg).is_file():
                problem = "a folder, not a file" if Path(arg).is_dir() else "file not found"
                raise DataError(f"{arg}: {problem}; expected the path of an existing {modality} file")
            items.append(arg)
    if not items:
        raise InputError(f"no {modality} inputs given; pass at least one file path (text: a string or @FILE)")
    return items


def _read_lines(path: Path, arg: str) -> list[str]:
    """The non-blank lines of an ``@FILE`` argument."""
    if not path.is_file():
        raise DataError(f"{path}: text file not found (from {arg!r}; @FILE reads one text per line)")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not lines:
        raise InputError(f"{path}: no text in it (from {arg!r}); expected one text per line")
    return lines


def embed_inputs(model: BindModel, modality: str, items: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 unit-norm rows in input order, with a progress bar for long inputs."""
    encoder = model[modality]
    out = []
    with torch.no_grad():
        for start in tqdm(
            range(0, len(items), batch_size), desc=f"embed {modality}", disable=len(items) <= batch_size, unit="batch"
        ):
            out.append(encoder.embed(items[start : start + batch_size], batch_size=batch_size).float().cpu())
    return torch.cat(out).numpy()
