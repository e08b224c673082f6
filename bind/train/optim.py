"""The optimizer side of a training step: AdamW groups, the warmup-cosine schedule, and the update.

:func:`apply_update` is the one place an optimizer step happens (the trainer and ``bindkit bench``
call it): clip the gradient norm, skip the update when the loss or the norm is not finite, step
the optimizer and the schedule, clamp learnable logit scales, clear the gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..model import BindModel
from ..recipe import OptimSpec


def param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and logit scales (parameters with ndim <= 1), as CLIP does."""
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def warmup_cosine(optim: OptimSpec, total_steps: int):
    """lr multiplier: linear warmup, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(
    params: list[torch.nn.Parameter], optim: OptimSpec, total_steps: int
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over ``params`` and its warmup-cosine schedule over ``total_steps`` optimizer steps."""
    optimizer = torch.optim.AdamW(param_groups(params, optim.weight_decay), lr=optim.lr, betas=optim.betas)
    return optimizer, LambdaLR(optimizer, warmup_cosine(optim, total_steps))


def clamp_logit_scales(model: BindModel) -> None:
    """Each encoder's :meth:`~bind.ModalityEncoder.clamp_logit_scale_`, after an optimizer step."""
    for encoder in model.encoders.values():
        encoder.clamp_logit_scale_()


def apply_update(
    model: BindModel,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loss: torch.Tensor | float,
    grad_clip: float | None,
) -> tuple[torch.Tensor, bool]:
    """Clip, then step unless the loss or gradient is NaN/inf; returns the gradient norm (a tensor on the
    gradients' device) and whether it stepped.

    A skipped update leaves the weights, the optimizer's moments and the schedule as they were: one bad
    batch must not poison the weights. The gradients are cleared either way. Deciding that is the step's one
    host sync (one ``.item()``); the loss and the norm stay on the device for the loop to read on log steps."""
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:  # the norm also when not clipping: a NaN gradient must be caught either way
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    finite = torch.isfinite(grad_norm) & torch.isfinite(torch.as_tensor(loss, device=grad_norm.device))
    stepped = bool(finite.item())
    if stepped:
        optimizer.step()
        scheduler.step()
        clamp_logit_scales(model)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach(), stepped
