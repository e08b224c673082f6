"""What of each tower trains: one rule, used by validation (:mod:`bind.recipe.checks`) and by the trainer.

A modality's ``freeze`` (with ``unfreeze_last_blocks``) is its setting; a stage's ``freeze`` overrides it for
that stage; the anchor of a bind stage is frozen ``all`` unless the stage says otherwise (its space is the
target). A LoRA tower's trunk is what the adapters replace, so its ``none`` acts as ``trunk``. The blocks a
modality unfreezes go with ``trunk`` wherever it comes from (the modality or a stage); ``none`` and ``all``
have no blocks to unfreeze.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from .schema import Recipe, StageSpec

FreezePart = Literal["none", "trunk", "all"]


class Freeze(NamedTuple):
    """The arguments of :meth:`bind.ModalityEncoder.freeze`."""

    part: FreezePart
    unfreeze_last_blocks: int = 0


def tower_freeze(recipe: Recipe, modality: str, stage: StageSpec | None = None) -> Freeze:
    """What of ``modality``'s tower trains: as assembled (``stage=None``), or during ``stage``."""
    spec = recipe.modalities[modality]
    part: FreezePart = spec.freeze
    if stage is not None:
        anchor_default = "all" if stage.kind == "bind" and modality == recipe.anchor_modality else None
        part = stage.freeze.get(modality, anchor_default) or part
    if spec.lora is not None and part == "none":
        part = "trunk"
    return Freeze(part, spec.unfreeze_last_blocks if part == "trunk" else 0)


def stage_modalities(recipe: Recipe, stage: StageSpec) -> list[str]:
    """The modalities a stage embeds: the specialist of a pretrain stage; the anchor and its pairs in a bind stage."""
    return [stage.modality] if stage.kind == "pretrain" else [recipe.anchor_modality, *stage.pairs]
