"""What a stage's loader yields for one modality at each step: a :class:`BindBatch`."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor


class BindBatch(NamedTuple):
    """This rank's slice of one step's batch of one modality.

    A NamedTuple, so that DataLoader workers send it and ``pin_memory`` pins its tensors as they do a tuple's.
    """

    anchor: Any  # the anchor's collated inputs, row i paired with inputs' row i (bind stages); None in a pretrain stage
    inputs: Any  # the modality's collated inputs, or item indices (a LongTensor) when its trunk features are cached
    labels: Tensor  # (B,) class ids: items with the same id are positives of each other
    bad: list[tuple[str, str]]  # (name, message) of the items that could not be read for this batch (skipped)
