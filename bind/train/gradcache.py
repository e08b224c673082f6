"""GradCache: a contrastive batch larger than memory, with the gradients of the whole batch.

The contrastive loss couples every row of a batch, but each tower's activations only depend on
their own rows. So (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"; sentence-transformers' Cached* losses):

1. embed the batch chunk by chunk without a graph, remembering the RNG state before each chunk;
2. compute the loss on the (detached) embeddings and backpropagate it to them: the loss graph is
   only ``B x D`` embeddings and a ``B x B`` similarity matrix;
3. re-run each chunk with a graph, RNG restored so dropout draws the same masks, and backpropagate
   the cached embedding gradient through it.

Peak memory is then one chunk's activations plus the loss, whatever the batch size; the price is
one extra forward pass. Gradients equal the unchunked ones (``tests/test_gradcache.py``), except
for layers whose output depends on the rest of the batch: BatchNorm in training mode sees
chunk statistics instead of batch statistics (and its running statistics are updated by both passes).

Example::

    chunked = ChunkedEmbedding(encoder, batch, chunk_size=128)
    loss = info_nce(chunked.embeddings, anchor_embeddings, encoder.logit_scale)
    loss.backward()       # gradients reach chunked.embeddings (and the logit scale)
    chunked.backward()    # ... and now the encoder's parameters
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from ..encoder import ClipBatch


def batch_size_of(batch: Any) -> int:
    """Number of items in a batch: a tensor, a dict of tensors or a :class:`ClipBatch`."""
    if isinstance(batch, ClipBatch):
        return batch.num_items
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)


def split_batch(batch: Any, chunk_size: int) -> list[Any]:
    """Consecutive chunks of at most ``chunk_size`` items; a :class:`ClipBatch` is split by item, not by clip:
    by slices of its ``counts`` when it has them (no value is read from the device), else by ``item_index``."""
    if isinstance(batch, ClipBatch):
        chunks = []
        offsets = [0, *itertools.accumulate(batch.counts)] if batch.counts is not None else None
        for start in range(0, batch.num_items, chunk_size):
            stop = min(start + chunk_size, batch.num_items)
            if offsets is not None:
                rows: Any = slice(offsets[start], offsets[stop])
                counts = batch.counts[start:stop]
            else:  # a nonzero: on CUDA the host waits for the GPU here
                rows, counts = ((batch.item_index >= start) & (batch.item_index < stop)).nonzero().squeeze(1), None
            clips = {k: v[rows] for k, v in batch.clips.items()} if isinstance(batch.clips, dict) else batch.clips[rows]
            chunks.append(ClipBatch(clips, batch.item_index[rows] - start, stop - start, counts))
        return chunks
    if isinstance(batch, dict):
        parts = {k: v.split(chunk_size) for k, v in batch.items()}
        return [dict(zip(parts, values, strict=True)) for values in zip(*parts.values(), strict=True)]
    return list(batch.split(chunk_size))


def batch_device(batch: Any) -> torch.device:
    """Where a batch's tensors live (a tensor, a dict of tensors or a :class:`ClipBatch`)."""
    if isinstance(batch, ClipBatch):
        batch = batch.clips
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return batch.device


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class ChunkedEmbedding:
    """Embeddings of ``batch`` computed in chunks without a graph; :meth:`backward` replays them with one.

    ``embed`` maps a chunk to its ``(n, D)`` embeddings (e.g. an encoder, or a function that looks
    up cached trunk features first). ``context`` is entered around every forward pass, the replay
    included (autocast, say), so both passes compute the same thing.
    """

    def __init__(
        self,
        embed: Callable[[Any], Tensor],
        batch: Any,
        chunk_size: int,
        device: torch.device | str | None = None,
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of items, got {chunk_size}")
        # the device whose RNG the replay restores (dropout on CUDA draws from it): by default the batch's
        self.device = torch.device(device) if device is not None else batch_device(batch)
        self.embed, self.context = embed, context
        self.chunks = split_batch(batch, chunk_size)
        self.rng_states = []
        outputs = []
        with torch.no_grad():
            for chunk in self.chunks:
                self.rng_states.append(_rng_state(self.device))
                with context():
                    outputs.append(embed(chunk))
        # a leaf: the loss's backward stops here and leaves the gradient in .grad
        self.embeddings = torch.cat(outputs).requires_grad_()
        self.sizes = [len(out) for out in outputs]

    def backward(self, last_chunk: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Backpropagate ``embeddings.grad`` (set by the loss's backward) through the encoder, chunk by chunk.

        ``last_chunk`` is entered around the last chunk's pass: after it the tower's gradients are final (the
        trainer starts their all-reduce there, :class:`bind.distributed.GradientReducer`)."""
        if self.embeddings.grad is None:
            raise RuntimeError("ChunkedEmbedding.backward: call backward on the loss first (embeddings have no grad)")
        grads = self.embeddings.grad.split(self.sizes)
        # replaying must not move the global RNG: the step after this one draws what it would have drawn
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            last = len(self.chunks) - 1
            for i, (chunk, (cpu_state, cuda_state), grad) in enumerate(
                zip(self.chunks, self.rng_states, grads, strict=True)
            ):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, self.device)
                with last_chunk() if i == last else nullcontext():
                    with self.context():
                        out = self.embed(chunk)
                    out.backward(grad.to(out.dtype))
