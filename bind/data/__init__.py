"""Datasets of raw items with labels, and how a recipe names them.

A dataset here is a ``torch.utils.data.Dataset`` of *raw* items (arrays, waveforms, strings, file
paths) with two extra attributes: ``labels`` (a (N,) long tensor: the concept each item shows,
used for concept pairing and evaluation) and ``names`` (how an item is shown in retrieval
results). Encoders' ``preprocess`` turns raw items into tensors later, in DataLoader workers.
:mod:`bind.data.datasets` holds :class:`Items`, the builders' registry and the data root; importing this package
registers the built-in builders (digits, manifests, shards) and the downloadable sets.

Builders are registered by name, as encoders are, so a plugin can add its own::

    @register_dataset("my_sensor")
    def my_sensor(root: Path, split: str, folder: str = "sensor") -> Items: ...
"""

from . import digits, digits_fetch, manifest, shards  # noqa: F401  (built-in builders register themselves)
from .datasets import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    DatasetBuilder,
    Items,
    build_dataset,
    cache_data_root,
    check_data_spec,
    locate_data_root,
    register_dataset,
    resolve_data_root,
)

__all__ = [
    "DEFAULT_DATA_ROOT",
    "DATASETS",
    "DatasetBuilder",
    "Items",
    "build_dataset",
    "cache_data_root",
    "check_data_spec",
    "locate_data_root",
    "register_dataset",
    "resolve_data_root",
]
