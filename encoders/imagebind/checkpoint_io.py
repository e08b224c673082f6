"""Reading an ImageBind checkpoint file: memory-mapped, tensors only, one clear line for anything else."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from bind import ConfigError

from .keymaps import CHECKPOINT_URL


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """An ImageBind state-dict file, memory-mapped where possible; a clear one-line error for anything else."""
    p = Path(path).expanduser()
    where = f"ImageBind checkpoint {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where} does not exist; download {CHECKPOINT_URL} (4.5 GB) and pass its path")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # an old (non-zip) serialization cannot be memory-mapped: read it whole
        if "mmap" not in str(err):
            raise ConfigError(f"{where} is not a PyTorch state-dict file ({str(err).splitlines()[0][:200]})") from None
        state = _load_whole(p, where)
    except Exception as err:  # pickles with code (refused by weights_only), truncated or foreign files
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(
            f"{where} is not a plain PyTorch state dict that loads with weights_only=True ({first}); "
            f"expected the format of {CHECKPOINT_URL}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{where} holds a {type(state).__name__}, not a state dict of tensors (ImageBind's format)")
    return state


def _load_whole(p: Path, where: str) -> dict[str, Tensor]:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(
            f"{where} is not a plain PyTorch state dict that loads with weights_only=True ({first})"
        ) from None
