"""A tiny model in ImageBind's checkpoint format, for tests and examples: every tower 32 wide, one block, two
heads, a 16-d output (:func:`save_tiny_checkpoint`). Random weights; the format is the released file's."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_shapes import RELEASED, tower_config
from .encoder import LOGIT_SCALE
from .keymaps import to_imagebind
from .trunks import ImageBindTrunk, imagebind_head

TINY_SIZES = {  # a small model in ImageBind's format, for tests: every tower 32 wide, 1 block, 2 heads, 16-d output
    "vision": {"kernel": [2, 4, 4], "stride": [2, 4, 4], "input_size": [16, 16]},
    "text": {"vocab_size": 49408, "context_length": 77},
    "audio": {"kernel": [16, 16], "stride": [10, 10], "input_size": [128, 204]},
    "depth": {"kernel": [8, 8], "stride": [8, 8], "input_size": [32, 32]},
    "thermal": {"kernel": [8, 8], "stride": [8, 8], "input_size": [32, 32]},
    "imu": {"kernel": [8], "stride": [8], "input_size": [400]},
}


def tiny_config(modality: str) -> dict[str, Any]:
    return tower_config(modality, width=32, depth=1, heads=2, out_dim=16, **TINY_SIZES[modality])


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random six-tower model in ImageBind's checkpoint format (bindkit's own modules, renamed), unless one is there."""
    if path.is_file():
        return path
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in RELEASED:
            cfg = tiny_config(m)
            tower = nn.Module()  # the weights of an ImageBindEncoder, without its preprocessing (no vocabulary needed)
            tower.trunk, tower.head = ImageBindTrunk(cfg), imagebind_head(cfg)
            tower.log_logit_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE.get(m, (1 / 0.07, False))[0])))
            state.update(to_imagebind(tower.state_dict(), m))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # whole or absent, with another process writing the same file
    return path
