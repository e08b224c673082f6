"""Training-time augmentation: the protocol an encoder's augmenter follows, and building one from a recipe.

The core defines no augmenter: an encoder registers its own (``register_encoder(...,
augmenter=AudioAugment)``, see ``encoders/audio_augment.py``), and a recipe's ``train_data.augment``
mapping holds that augmenter's keyword arguments. An augmenter has two methods, both drawing every
random number from the ``torch.Generator`` they are given (the dataset seeds it per seed, epoch and
item, so a run is reproducible whatever the number of DataLoader workers):

* ``augment_raw(item, generator)``: the raw item (what a file reads to) before ``preprocess``;
* ``augment_tensor(x, generator)``: the preprocessed tensor after it.

The anchor of a bind stage is never augmented (its space is the target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..registry import EncoderInfo
from ..typed_yaml import build


class Augmenter(Protocol):
    def augment_raw(self, item: Any, generator: torch.Generator) -> Any: ...

    def augment_tensor(self, x: Any, generator: torch.Generator) -> Any: ...


def check_augment(info: EncoderInfo, knobs: dict[str, Any], where: str) -> Augmenter | None:
    """The encoder has an augmenter and it takes these knobs, of these types (a recipe's ``augment:``).

    Returns the augmenter built from the checked values (numbers written as text converted, lists as tuples),
    or ``None`` for a plugin's augmenter that is no dataclass (its own call checks its arguments)."""
    if info.augmenter is None:
        raise ConfigError(
            f"{where}: encoder {info.name!r} defines no augmentation; remove augment, or register the encoder "
            "with an augmenter (register_encoder(..., augmenter=MyAugment))"
        )
    if not dataclasses.is_dataclass(info.augmenter):
        return None
    try:
        return build(info.augmenter, knobs, where, ranges={})
    except ValueError as err:  # the augmenter's own check of its values (a range given high to low)
        raise ConfigError(f"{where}: {err}") from None


def build_augment(info: EncoderInfo, knobs: dict[str, Any], where: str = "augment") -> Augmenter | None:
    """The encoder's augmenter with a recipe's ``augment:`` knobs (lists become tuples); ``{}``: no augmentation."""
    if not knobs:
        return None
    built = check_augment(info, knobs, where)
    if built is not None:  # the values the check converted, not the text they were written as
        return built
    try:
        return info.augmenter(**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
