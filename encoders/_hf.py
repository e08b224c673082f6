"""Loading Hugging Face towers from local directories, never from a hub.

A saved bindkit model keeps the tower's weights in its own ``model.safetensors``; what it also
needs to rebuild the tower (the HF config, the tokenizer or processor files) is exported next to
it by :func:`export_hf`, and reloaded with ``load_weights=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    return processor_cls.from_pretrained(check_local_dir(path, what), local_files_only=True)


def export_hf(directory: Path, model: Any, *processors: Any) -> dict[str, Any]:
    """Save ``model``'s config and ``processors`` into ``directory``; return the kwargs to rebuild from it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    for processor in processors:
        if processor is not None:
            processor.save_pretrained(directory)
    return {"path": str(Path(directory.parent.name) / directory.name), "load_weights": False}
