"""Datasets of raw items with labels, the registry of their builders, and the data root.

A dataset here is a ``torch.utils.data.Dataset`` of *raw* items (arrays, waveforms, strings, file
paths) with two extra attributes: ``labels`` (a (N,) long tensor: the concept each item shows,
used for concept pairing and evaluation) and ``names`` (how an item is shown in retrieval
results). Encoders' ``preprocess`` turns raw items into tensors later, in DataLoader workers.

Builders are registered by name, as encoders are, so a plugin can add its own::

    @register_dataset("my_sensor")
    def my_sensor(root: Path, split: str, folder: str = "sensor") -> Items: ...
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, did_you_mean

DEFAULT_DATA_ROOT = Path("../shared/data")


class Items(Dataset):
    """Raw items with labels. ``items`` is a sequence, or a function of the index (lazily made items)."""

    def __init__(
        self,
        items: Sequence[Any] | Callable[[int], Any],
        labels: Sequence[int] | torch.Tensor,
        names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self._items = items
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.labels))]
        self.class_names = list(class_names) if class_names is not None else None
        if not callable(items) and len(items) != len(self.labels):
            raise ValueError(f"{len(items)} items but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        return self._items(index) if callable(self._items) else self._items[index]

    def subset(self, indices: Sequence[int]) -> Items:
        indices = list(indices)
        return Items(
            lambda i: self[indices[i]], self.labels[indices], [self.names[i] for i in indices], self.class_names
        )


DatasetBuilder = Callable[..., Items]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a builder ``(root: Path, split: str, **args) -> Items`` under ``name``."""

    def decorator(fn: DatasetBuilder) -> DatasetBuilder:
        DATASETS[name] = fn
        return fn

    return decorator


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the argument, else ``$BINDKIT_DATA``, else ``../shared/data`` when it exists (this project's
    checkouts and CI), else the platform cache folder (``~/.cache/bindkit/data`` on Linux), where
    ``bindkit data fetch`` puts downloads."""
    return locate_data_root(root)[0]


def locate_data_root(root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """:func:`resolve_data_root` and where it came from: ``argument``, ``$BINDKIT_DATA``, ``../shared/data`` or
    ``cache`` (for ``bindkit doctor``)."""
    if root:
        return Path(root).expanduser(), "argument"
    if os.environ.get("BINDKIT_DATA"):
        return Path(os.environ["BINDKIT_DATA"]).expanduser(), "$BINDKIT_DATA"
    if DEFAULT_DATA_ROOT.is_dir():
        return DEFAULT_DATA_ROOT, str(DEFAULT_DATA_ROOT)
    return cache_data_root(), "cache"


def cache_data_root() -> Path:
    """The platform's cache folder for bindkit's data (pooch's ``os_cache``: XDG on Linux, Caches on macOS)."""
    import pooch  # only when no other root applies: it imports requests

    return Path(pooch.os_cache("bindkit")) / "data"


def check_data_spec(spec: Any, root: str | None, where: str) -> None:
    """Validate a recipe's DataSpec without reading the data: builder name, arguments, paths."""
    if spec.source not in DATASETS:
        raise ConfigError(f"{where}.source: unknown dataset {spec.source!r}; known: {', '.join(sorted(DATASETS))}")
    builder = DATASETS[spec.source]
    params = inspect.signature(builder).parameters
    unknown = sorted(set(spec.args) - set(params) - {"root", "split"})
    if unknown:
        raise ConfigError(
            f"{where}.args: {spec.source!r} does not take {', '.join(unknown)}; it takes: "
            f"{', '.join(p for p in params if p not in ('root', 'split'))}"
        )
    missing = [
        name
        for name, p in params.items()
        if name not in ("root", "split") and p.default is inspect.Parameter.empty and name not in spec.args
    ]
    if missing:
        raise ConfigError(
            f"{where}.args: {spec.source!r} needs {', '.join(missing)}; got {sorted(spec.args) or 'none'}"
        )
    for name in ("path", "column"):  # file and column names are text: a number or a list there is a typo
        if name in spec.args and name in params and not isinstance(spec.args[name], str):
            raise ConfigError(f"{where}.args.{name}: expected text, got {spec.args[name]!r}")
    splits = getattr(builder, "splits", None)
    if splits is not None and spec.split not in splits:
        raise ConfigError(
            f"{where}.split: {spec.source!r} has splits {', '.join(map(repr, splits))}; got {spec.split!r}; "
            f"{did_you_mean(spec.split, splits)}".rstrip("; ")
        )
    base = resolve_data_root(root)
    required = getattr(builder, "required_paths", None)
    if required is not None:
        for rel in required(**spec.args):
            if not (base / rel).exists():
                fetch = getattr(builder, "fetch", None)  # a set bindkit can download (bind/data/fetch.py)
                hint = (
                    f"; `bindkit data fetch {fetch}` downloads it (bindkit run does so on first run)" if fetch else ""
                )
                raise DataError(
                    f"{where}: {base / rel} not found. Put the data there, or point data_root (recipe key), "
                    f"`data_root=...` on the command line or $BINDKIT_DATA at the folder that holds {rel}{hint}"
                )
    check = getattr(builder, "check", None)  # a cheap look inside (a manifest's columns and splits)
    if check is not None:
        try:
            check(base, spec.split, **spec.args)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None


def build_dataset(spec: Any, root: str | None) -> Items:
    """Build the :class:`Items` a recipe's DataSpec describes.

    Streamed data (``stream: true``) is read by its stream; here only its builder's ``stream_summary``
    (size and classes, no item read) is built."""
    builder = DATASETS[spec.source]
    if getattr(spec, "stream", False) and hasattr(builder, "stream_summary"):
        return builder.stream_summary(resolve_data_root(root), spec.split, **spec.args)
    return builder(resolve_data_root(root), spec.split, **spec.args)
