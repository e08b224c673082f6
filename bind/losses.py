"""Contrastive losses as pure functions with explicit arguments.

Embeddings are expected L2-normalised; logits are computed in float32 (float64 stays float64) even
under autocast, since a bf16 softmax over a large batch loses the small differences the loss lives on.

Example::

    loss = info_nce(image_emb, audio_emb, logit_scale=audio_encoder.logit_scale)

A recipe's ``loss:`` names one of them through the registry at the end of this module, where a plugin
registers its own (``@register_loss("my_loss", kind="bind")``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, did_you_mean

LossFn = TypeVar("LossFn", bound=Callable[..., Tensor])


def _at_least_float32(*tensors: Tensor) -> list[Tensor]:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _logits(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
    """(N, D), (M, D) -> (N, M) scaled cosine similarities in at least float32."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = _at_least_float32(a, b)
        return torch.as_tensor(logit_scale, device=a.device, dtype=a.dtype) * (a @ b.T)


def _rows(n: int, rows: slice | None) -> slice:
    return slice(0, n) if rows is None else slice(*rows.indices(n))


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor | float, rows: slice | None = None) -> Tensor:
    """Symmetric InfoNCE (the CLIP loss): row ``i`` of ``a`` and of ``b`` are a positive pair.

    Every other row of the other side in the batch is a negative. The mean of the a->b and b->a
    cross-entropies over the (N, N) similarity matrix.

    ``rows`` scores only those rows of each side against all columns of the other (open_clip's
    ``local_loss``): in data-parallel training ``a`` and ``b`` are the gathered global batch and
    ``rows`` this rank's slice; the mean over ranks is the full loss.
    """
    if a.shape != b.shape:
        raise ValueError(f"info_nce needs paired embeddings of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    everything = rows is None
    rows = _rows(a.shape[0], rows)
    targets = torch.arange(rows.start, rows.stop, device=a.device)
    logits_ab = _logits(a[rows], b, logit_scale)
    # the whole batch: b's logits are the transpose of a's (one N x N product, as open_clip); a slice needs its own
    logits_ba = logits_ab.T if everything else _logits(b[rows], a, logit_scale)
    return (F.cross_entropy(logits_ab, targets) + F.cross_entropy(logits_ba, targets)) / 2


def _mean_log_prob_of_positives(logits: Tensor, positives: Tensor) -> Tensor:
    """Per row: mean over positive columns of log softmax(row); 0 for rows without positives."""
    log_prob = logits.log_softmax(dim=1)
    # clamp, not a plain division: 0/0 rows would send NaN gradients even when masked out later
    return (log_prob * positives.float()).sum(1) / positives.sum(1).clamp(min=1)


def _mean_over(values: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``values`` over the selected ``rows``; 0 (still attached to the graph) when none is selected,
    as the reference SupCon does, so a batch without any positive pair is not a NaN step."""
    return values.masked_fill(~rows, 0).sum() / rows.sum().clamp(min=1)


def label_aware_info_nce(
    a: Tensor, b: Tensor, labels_a: Tensor, labels_b: Tensor, logit_scale: Tensor | float, rows: slice | None = None
) -> Tensor:
    """Cross-modal InfoNCE where every pair sharing a label is a positive.

    For concept-paired data (a spoken "seven" paired with any drawn seven) diagonal-only InfoNCE
    treats the batch's other sevens as negatives. Here each row's target is uniform over the
    columns with its label (cross-entropy against that distribution), in both directions.
    Rows whose label has no match on the other side are ignored (no row with a match: 0). ``rows``:
    score only those rows against the whole other side. Unlike :func:`info_nce`, slices average to the
    full loss only when every slice holds the same number of matched rows (each slice averages over
    its own matched rows).
    """
    everything = rows is None
    a_rows, b_rows = _rows(a.shape[0], rows), _rows(b.shape[0], rows)  # a and b may differ in size
    a_positives = labels_a[a_rows, None] == labels_b[None, :]
    b_positives = labels_b[b_rows, None] == labels_a[None, :]
    logits_ab = _logits(a[a_rows], b, logit_scale)
    logits_ba = logits_ab.T if everything else _logits(b[b_rows], a, logit_scale)  # as in info_nce
    a_to_b = _mean_log_prob_of_positives(logits_ab, a_positives)
    b_to_a = _mean_log_prob_of_positives(logits_ba, b_positives)
    return -(_mean_over(a_to_b, a_positives.any(1)) + _mean_over(b_to_a, b_positives.any(1))) / 2


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al., 2020), the L_out form, for one modality.

    For each item, a log-softmax over all *other* items; the loss averages the log-probability of
    its positives (other items with its label). Items without a positive in the batch are dropped (none: 0).
    To use several views per item, concatenate them and repeat the labels.
    """
    n = features.shape[0]
    logits = _logits(features, features, 1.0 / temperature)
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    per_item = _mean_log_prob_of_positives(logits.masked_fill(self_mask, -1e9), positives)
    return -_mean_over(per_item, positives.any(1))


def pairwise_cosine_loss(a: Tensor, b: Tensor, same: Tensor) -> Tensor:
    """The MNIST lesson's loss: mean squared error between cos(a_i, b_i) and 1 (same class) or 0.

    ``same`` is a (N,) bool or float tensor. Under this loss classes spread as spokes from the
    origin rather than as blobs.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = _at_least_float32(a, b)
        cosine = F.cosine_similarity(a, b, dim=-1)
        return F.mse_loss(cosine, same.to(cosine.dtype))


# ---- the loss registry -------------------------------------------------------------------------
# A recipe's ``loss:`` is a name looked up here, by validation and by the training step alike; a plugin
# adds a loss with ``@register_loss`` exactly as the built-ins below do. Each kind has one call signature:
#   bind:     fn(z, anchor, labels, *, logit_scale, rows) -> scalar  (a paired modality against the anchor)
#   pretrain: fn(z, labels, *, temperature) -> scalar                 (one modality on its own, with labels)
# ``z`` and ``anchor`` are the global batch's L2-normalised embeddings (row i of each a pair), ``labels`` its
# class indices, ``rows`` this rank's rows under ``local_loss`` (None: all; see :func:`info_nce`).

LossKind = Literal["bind", "pretrain"]
LOSS_KINDS: tuple[LossKind, ...] = ("bind", "pretrain")


@dataclass(frozen=True)
class LossInfo:
    """A registered loss: its name, the stage kind it serves and the function the step calls."""

    name: str
    kind: LossKind
    fn: Callable[..., Tensor]

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


_LOSSES: dict[str, LossInfo] = {}


def register_loss(name: str, *, kind: LossKind) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as the loss ``name`` for ``kind`` stages (signatures above); a recipe names it in ``loss:``."""
    if kind not in LOSS_KINDS:
        raise ConfigError(f"register_loss({name!r}): kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")

    def decorator(fn: LossFn) -> LossFn:
        _LOSSES[name] = LossInfo(name, kind, fn)
        return fn

    return decorator


def list_losses(kind: LossKind | None = None) -> list[str]:
    """Sorted names of the registered losses, optionally of one stage ``kind``."""
    return sorted(n for n, info in _LOSSES.items() if kind in (None, info.kind))


def get_loss(name: str, kind: LossKind | None = None) -> LossInfo:
    """The loss registered as ``name``; a one-line ConfigError for an unknown name or one of another kind."""
    choices = list_losses(kind)
    if name not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; {did_you_mean(name, choices)}expected one of {', '.join(choices)}")
    info = _LOSSES[name]
    if kind is not None and info.kind != kind:
        raise ConfigError(f"{name!r} is a {info.kind} loss; a {kind} stage takes {', '.join(choices)}")
    return info


@register_loss("info_nce", kind="bind")
def _info_nce_pairs(z: Tensor, anchor: Tensor, labels: Tensor, *, logit_scale: Tensor, rows: slice | None) -> Tensor:
    """CLIP's InfoNCE: row i of each side is the only positive; every other row in the batch is a negative."""
    return info_nce(z, anchor, logit_scale, rows=rows)


@register_loss("label_aware_info_nce", kind="bind")
def _label_aware_pairs(z: Tensor, anchor: Tensor, labels: Tensor, *, logit_scale: Tensor, rows: slice | None) -> Tensor:
    """InfoNCE where every pair sharing a label is a positive (no same-class negatives)."""
    return label_aware_info_nce(z, anchor, labels, labels, logit_scale, rows=rows)


@register_loss("supcon", kind="pretrain")
def _supcon(z: Tensor, labels: Tensor, *, temperature: float) -> Tensor:
    """Supervised contrastive loss over the batch (items with the same label are positives)."""
    return supcon_loss(z, labels, temperature)


@register_loss("pairwise_cosine", kind="pretrain")
def _pairwise_cosine(z: Tensor, labels: Tensor, *, temperature: float) -> Tensor:
    """The MNIST lesson's loss: each item against the next one in the (shuffled) batch."""
    return pairwise_cosine_loss(z, z.roll(1, 0), labels == labels.roll(1, 0))
