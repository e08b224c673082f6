"""Hugging Face towers: loading them from local directories or hub ids, and a base class for their encoders.

A hub id (``"sentence-transformers/all-MiniLM-L6-v2"``) resolves through Hugging Face's standard cache
(``$HF_HOME``, ``$HF_HUB_CACHE``), downloading what is missing unless ``$HF_HUB_OFFLINE=1``; a model that is
neither cached nor downloadable is a one-line :class:`~bind.errors.DataError` saying what to download.

A saved bindkit model keeps the tower's weights in its own ``model.safetensors``; what it also
needs to rebuild the tower (the HF config, the tokenizer or processor files) is exported next to
it by :func:`export_hf`, and reloaded with ``load_weights=False``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from bind import ModalityEncoder, find_blocks
from bind.encoder import HeadKind
from bind.errors import DataError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "bert-base-uncased", "org/name"


def resolve_hf(path: str | os.PathLike[str], what: str) -> Path | str:
    """A local model directory (a Path: it must hold ``config.json``) or a hub id (a str), or a clear error."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DataError(
                f"{what}: {str(p)!r} is a directory without config.json; expected a Hugging Face model directory "
                "(saved with `save_pretrained(DIR)`) or a hub id such as 'sentence-transformers/all-MiniLM-L6-v2'"
            )
        return p
    text = os.fspath(path)
    if HUB_ID.fullmatch(text) and ".." not in text and "--" not in text and not p.exists():
        return text
    raise DataError(
        f"{what}: {text!r} is neither a local Hugging Face model directory (with config.json) nor a hub id "
        "(name or org/name); expected e.g. 'sentence-transformers/all-MiniLM-L6-v2' or a folder from save_pretrained"
    )


def hub_hint(repo: str, what: str, err: BaseException) -> str:
    """One line: ``repo`` is not cached and could not be downloaded (or this process is offline); how to get it."""
    from huggingface_hub import constants

    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    state = "is offline ($HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "could not download it"
    return (
        f"{what}: {repo!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and this process {state}: "
        f"run `hf download {repo}` on a machine with network access (with the same $HF_HOME), or pass a local "
        f"directory ({first})"
    )


def from_source(load: Any, source: Path | str, what: str, **kwargs: Any) -> Any:
    """``load(source)`` (a ``from_pretrained``): a directory with ``local_files_only``, a hub id through the cache."""
    if isinstance(source, Path):
        return load(source, local_files_only=True, **kwargs)
    try:  # transformers reads $HF_HUB_OFFLINE and $HF_HOME through huggingface_hub
        return load(source, **kwargs)
    except OSError as err:  # not cached and offline, no network, or no such repository
        raise DataError(hub_hint(source, what, err)) from None


def load_hf_model(model_cls: Any, path: str | os.PathLike[str], load_weights: bool = True, what: str = "model") -> Any:
    """``model_cls.from_pretrained(path)``, or only its architecture from the config when ``load_weights`` is False.

    ``path`` is a local directory or a hub id (resolved through Hugging Face's cache, ``$HF_HUB_OFFLINE`` honoured).
    """
    source = resolve_hf(path, what)
    if load_weights:
        return from_source(model_cls.from_pretrained, source, what)
    return model_cls._from_config(from_source(model_cls.config_class.from_pretrained, source, what))


def load_hf_processor(processor_cls: Any, path: str | os.PathLike[str], what: str = "processor") -> Any:
    """``processor_cls.from_pretrained(path)`` (a tokenizer, an image or feature processor): a directory or a hub id."""
    return from_source(processor_cls.from_pretrained, resolve_hf(path, what), what)


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
