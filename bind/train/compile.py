"""Speed without changing results: ``torch.compile`` per tower, and the channels-last memory formats.

:func:`compile_tower` is what a stage calls a trainable tower through when a recipe says ``compile: true``;
:func:`to_channels_last` and :func:`input_channels_last` are ``channels_last: true`` (NHWC 2-D convolutions, faster
with bf16 on tensor cores), for the model and for each batch.

Why not ``torch.compile(encoder)``: dynamo keeps its compiled graphs on the *code object* of the frame it
compiles, and every encoder's frame is the one ``ModalityEncoder.forward``. All towers of a model (and of every
stage of a recipe, since a stage compiles again) share that one cache of ``recompile_limit`` (8) entries, and each
tower fills several: one per grad mode (GradCache's no-grad pass, then its replay with a graph), one per input
type and rank (a tensor, a :class:`~bind.encoder.ClipBatch`, 4-D or 5-D clips), and twice that for the batch size
(the first graphs are specialised to the first size; those after a size changes are dynamic). Three towers make
twelve: at the ninth, dynamo logs "hit config.recompile_limit (8)" once and from then on runs every call that no
cached graph fits eagerly (tests/test_compile.py shows it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..encoder import Batch, ClipBatch, ModalityEncoder

_numbers = itertools.count()  # one code object per compiled tower: see compile_tower
GRAPHS_PER_TOWER = 16  # dynamo's recompile_limit while a compiled tower runs (at least; 8 by default)


def compile_tower(encoder: ModalityEncoder, backend: str = "inductor") -> Callable[[Batch], Tensor]:
    """``encoder``'s forward (a tensor, a dict of tensors or a :class:`ClipBatch` in, unit-norm ``(B, D)`` out)
    with its trunk compiled in a cache of its own and its batch dimension dynamic.

    - Its own cache: the trunk is called from a function whose code object is made for this call (a copy of one
      function's code, renamed), so dynamo's cache, its ``recompile_limit`` and its record of which sizes varied
      (kept by file, line and *name*) belong to this tower alone, and to this stage alone: a later stage's tower
      starts empty rather than behind the graphs of the earlier one.
    - Dynamic batch: dim 0 of every input tensor is marked dynamic (``maybe_mark_dynamic``: a hint, no error where
      the trunk needs a fixed size), so every batch size and GradCache's last, smaller chunk run one graph; a batch
      of one is still specialised (dynamo's 0/1 rule), one more graph.
    - Trunk only: the head, the normalisation and a :class:`ClipBatch`'s per-item averaging (``embed_features``)
      run eagerly. They are a matmul or two, and compiling them would guard on ``num_items``, a Python int.
    - What is left: a graph per grad mode, since GradCache's no-grad pass and its replay trace different graphs:
      two, four with a batch (or last chunk) of one. Another dimension that varies (a text's length) is static in
      the first graphs and dynamic after it changes, two more; the training flag is guarded too, but a stage stays
      in train mode. That is 8 at most, and dynamo's ``recompile_limit`` (8, counted on this tower's own entries now)
      is raised to ``GRAPHS_PER_TOWER`` while the tower runs, so that a ninth is not where it turns eager.
    - With inductor, random ops (dropout, stochastic depth) draw from torch's generator as the eager tower does
      (``fallback_random``): a seed gives the same masks compiled or not, and GradCache's replay, which restores
      that generator, draws its first pass's masks whether or not inductor would order its own seeds alike in the
      no-grad graph and the one with grad. The price: dropout is not fused with its neighbours.

    An encoder that overrides ``forward`` itself is compiled whole instead (its own cache, dynamic batch too).
    A graph break inside the trunk compiles the code after it on the trunk's own, shared code objects: such a
    trunk is only as good as it was before.
    """
    whole = type(encoder).forward is not ModalityEncoder.forward

    def run(batch: Any) -> Tensor:
        return encoder(batch) if whole else encoder.forward_features(batch)

    name = f"{'forward' if whole else 'forward_features'}_{encoder.modality}_{next(_numbers)}"
    code = run.__code__
    run.__code__ = code.replace(co_name=name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {}))
    options = {"fallback_random": True} if backend == "inductor" else None
    compiled = torch.compile(run, backend=backend, options=options)

    def tower(batch: Batch) -> Tensor:
        _mark_batch_dynamic(batch)
        clips = isinstance(batch, ClipBatch) and not whole
        limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_TOWER)
        with torch._dynamo.config.patch(recompile_limit=limit):  # dynamo reads it when a call finds no graph
            out = compiled(batch.clips if clips else batch)
        if whole:
            return out
        return encoder.embed_features(out, batch.item_index, batch.num_items) if clips else encoder.embed_features(out)

    return tower


def _mark_batch_dynamic(batch: Any) -> None:
    if isinstance(batch, Tensor):
        if batch.ndim:
            torch._dynamo.maybe_mark_dynamic(batch, 0)
    elif isinstance(batch, ClipBatch):
        _mark_batch_dynamic(batch.clips)
        _mark_batch_dynamic(batch.item_index)
    elif isinstance(batch, dict):
        for value in batch.values():
            _mark_batch_dynamic(value)


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` (in place, and returned) with its 4-D parameters and buffers (Conv2d weights) channels-last; the
    rest, 5-D Conv3d weights included, unchanged.

    ``module.to(memory_format=torch.channels_last)`` asks that format of 5-D tensors too, which have none ("required
    rank 4 tensor"): it fails on any tower with a Conv3d (ImageBind's vision stem). Conv3d is left as it is rather
    than made channels-last-3d: a 5-D input's layout is the tower's own (ImageBind's ``(B, C, T, H, W)``, a frame
    tower's ``(B, T, C, H, W)``), and the wrong guess costs a copy of the batch every step."""
    return module._apply(_channels_last)  # what Module.to runs: parameters, their gradients and buffers


def input_channels_last(batch: Any) -> Any:
    """A batch with its 4-D tensors (images, spectrograms: ``(B, C, H, W)``) channels-last, the format of the
    Conv2d weights :func:`to_channels_last` gives; dicts and :class:`ClipBatch` walked, anything else as it is."""
    if isinstance(batch, Tensor):
        return _channels_last(batch)
    if isinstance(batch, ClipBatch):
        return ClipBatch(input_channels_last(batch.clips), batch.item_index, batch.num_items, batch.counts)
    if isinstance(batch, dict):
        return {k: input_channels_last(v) for k, v in batch.items()}
    return batch
