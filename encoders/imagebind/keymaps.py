"""ImageBind's checkpoint format: which keys hold one tower, and how they map to bindkit's.

ImageBind's ``imagebind_huge.pth`` keeps each tower ``m`` under four prefixes (``modality_preprocessors.m.``,
``modality_trunks.m.``, ``modality_heads.m.``, ``modality_postprocessors.m.``); a bindkit tower has ``trunk.``,
``head.`` and ``log_logit_scale``. :func:`from_imagebind` renames one way, :func:`to_imagebind` the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bind import ConfigError

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
PREFIXES = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")


def key_map(modality: str) -> list[tuple[str, str | None]]:
    """``(ImageBind key prefix, bindkit key prefix)`` pairs of one tower; ``None``: a buffer rebuilt, not loaded."""
    pre, trunk, head, post = (f"{p}.{modality}." for p in PREFIXES)
    pairs: list[tuple[str, str | None]] = [(f"{trunk}blocks.", "trunk.blocks.")]
    if modality == "text":
        return [
            *pairs,
            (f"{pre}token_embedding.", "trunk.token_embedding."),
            (f"{pre}pos_embed", "trunk.pos_embed"),
            (f"{pre}mask", None),
            (f"{head}proj.0.", "trunk.norm."),
            (f"{head}proj.1.", "head."),
            (f"{post}1.log_logit_scale", "log_logit_scale"),
        ]
    pairs += [(f"{pre}cls_token", "trunk.cls_token"), (f"{head}0.", "trunk.norm.")]
    if modality == "vision":
        return [
            *pairs,
            (f"{pre}pos_embedding_helper.pos_embed", "trunk.pos_embed"),
            (f"{pre}rgbt_stem.proj.1.", "trunk.patch_embed."),
            (f"{trunk}pre_transformer_layer.0.", "trunk.norm_pre."),
            (f"{head}2.", "head."),
        ]
    if modality == "imu":
        stem, projection, pos = f"{pre}imu_stem.", (f"{head}3.", "head.1."), f"{pre}pos_embed"
    else:
        stem = f"{pre}{'depth_stem' if modality == 'depth' else 'rgbt_stem'}."
        projection, pos = (f"{head}2.", "head."), f"{pre}pos_embedding_helper.pos_embed"
    return [
        *pairs,
        (pos, "trunk.pos_embed"),
        (f"{stem}proj.", "trunk.patch_embed."),
        (f"{stem}norm_layer.", "trunk.patch_norm."),
        projection,
        (f"{post}1.log_logit_scale", "log_logit_scale"),
    ]


def _rename(key: str, pairs: list[tuple[str, str | None]], reverse: bool = False) -> tuple[bool, str | None]:
    for theirs, ours in pairs:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if src is not None and key.startswith(src):
            return True, None if dst is None else dst + key[len(src) :]
    return False, None


def from_imagebind(state: dict[str, Tensor], modality: str, where: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of one ImageBind tower, renamed to bindkit's keys (``trunk.``, ``head.``, ``log_logit_scale``)."""
    pairs, out = key_map(modality), {}
    for key in tower_keys(state, modality, where):
        known, ours = _rename(key, pairs)
        if not known:
            raise ConfigError(f"{where}: key {key!r} is not part of ImageBind's {modality} tower as bindkit knows it")
        if ours is not None:
            out[ours] = state[key]
    return out


def tower_keys(state: dict[str, Tensor], modality: str, where: str = "checkpoint") -> list[str]:
    """The keys of one tower in an ImageBind-format state dict; a one-line error naming the towers there if none."""
    mine = [k for k in state if any(k.startswith(f"{p}.{modality}.") for p in PREFIXES)]
    if not mine:
        present = sorted({k.split(".")[1] for k in state if k.split(".")[0] in PREFIXES and k.count(".") > 1})
        raise ConfigError(
            f"{where} has no ImageBind {modality} tower: expected keys under modality_trunks.{modality}. "
            f"(the format of {CHECKPOINT_URL}); it has towers: {', '.join(present) or 'none'}"
        )
    return mine


def to_imagebind(state: dict[str, Tensor], modality: str) -> dict[str, Tensor]:
    """The inverse of :func:`from_imagebind`: a bindkit ImageBind tower's weights under ImageBind's keys."""
    out = {}
    for key, value in state.items():
        known, theirs = _rename(key, key_map(modality), reverse=True)
        if known and theirs is not None:
            out[theirs] = value
    if modality == "text":
        context = out["modality_preprocessors.text.pos_embed"].shape[1]
        out["modality_preprocessors.text.mask"] = causal_mask(context)
    return out


def causal_mask(length: int) -> Tensor:
    """Additive causal attention mask: position i sees positions <= i.

    The text tower's buffer: ImageBind's checkpoint stores it (``modality_preprocessors.text.mask``), bindkit
    rebuilds it (:class:`~encoders.imagebind.trunks.ImageBindTrunk`) rather than loading it."""
    return torch.full((length, length), float("-inf")).triu_(1)
