"""Hugging Face towers: loading them from local directories (never from a hub), and a base class for their encoders.

A saved bindkit model keeps the tower's weights in its own ``model.safetensors``; what it also
needs to rebuild the tower (the HF config, the tokenizer or processor files) is exported next to
it by :func:`export_hf`, and reloaded with ``load_weights=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from bind import ModalityEncoder, find_blocks
from bind.encoder import HeadKind
from bind.errors import DataError


def check_local_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path if it is a directory holding ``config.json``; a clear error otherwise."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise DataError(
            f"{what}: {str(p)!r} is not a local Hugging Face model directory (expected {p / 'config.json'}); "
            "bindkit never downloads weights: save the model with `save_pretrained(DIR)` and pass DIR"
        )
    return p


def load_hf_model(model_cls: Any, path: str | os.PathLike[str], load_weights: bool = True, what: str = "model") -> Any:
    """``model_cls.from_pretrained(path)``, or only its architecture from the config when ``load_weights`` is False."""
    p = check_local_dir(path, what)
    if load_weights:
        return model_cls.from_pretrained(p, local_files_only=True)
    config = model_cls.config_class.from_pretrained(p, local_files_only=True)
    return model_cls._from_config(config)


def load_hf_processor(processor_cls: Any, path: str | os.PathLike[str], what: str = "processor") -> Any:
    """``processor_cls.from_pretrained(path)`` (a tokenizer, an image or feature processor) from a local directory."""
    return processor_cls.from_pretrained(check_local_dir(path, what), local_files_only=True)


def export_hf(directory: Path, model: Any, *processors: Any) -> dict[str, Any]:
    """Save ``model``'s config and ``processors`` into ``directory``; return the kwargs to rebuild from it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    for processor in processors:
        if processor is not None:
            processor.save_pretrained(directory)
    return {"path": str(Path(directory.parent.name) / directory.name), "load_weights": False}


# Sizes the tiny image, video and text Hugging Face towers saved for tests share (a tower may override one).
TINY_TRANSFORMER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def save_tiny_hf(path: Path, model_cls: Any, config: Any, *processors: Any) -> str:
    """Save a random ``model_cls(config)`` and ``processors`` in ``path``, unless a model is there; ``str(path)``.

    For the ``tiny`` variants of Hugging Face towers (tests): a scratch directory pays for the model once.
    """
    if not (path / "config.json").is_file():
        model_cls(config).save_pretrained(path)
        for processor in processors:
            processor.save_pretrained(path)
    return str(path)


class HFEncoder(ModalityEncoder):
    """A Hugging Face tower and its processor (tokenizer, image or feature processor).

    Its blocks are the model's layer stack (the longest ``nn.ModuleList``, :func:`bind.find_blocks`), and a
    saved model gets the config and processor files it needs to be rebuilt (:func:`export_hf`).
    """

    def __init__(
        self,
        modality: str,
        model: nn.Module,
        processor: Any,
        trunk_dim: int,
        embed_dim: int,
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
    ) -> None:
        super().__init__(modality, model, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        self.processor = processor
        self.blocks = find_blocks(model)  # a plain list: the modules stay registered once, under trunk

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.processor)
