"""Data-parallel training with ``torch.distributed``: one process per device, global negatives.

``torchrun --nproc_per_node N -m bind run RECIPE`` (or ``bindkit run RECIPE --nproc N``) starts N
processes; each reads its rank from the environment torchrun sets. Every rank takes its own
contiguous slice of each global batch (:class:`bind.data.pairs.EpochSampler` with ``rank``), embeds
it, and :func:`gather_with_grad` concatenates the embeddings of all ranks *with* their gradient
path, so every rank's contrastive loss sees the negatives of the whole global batch (as CLIP and
open_clip do). With ``local_loss`` a rank scores only its own rows against all columns (open_clip's
``local_loss``): the same gradient, an ``(N/W) x N`` instead of ``N x N`` similarity matrix.

Gradients are averaged across ranks by :func:`all_reduce_gradients` once per optimizer step,
rather than by ``DistributedDataParallel``'s backward hooks: a step may run several backward
passes (GradCache chunks, gradient accumulation) and towers with cached trunk features are called
through ``embed_features``, not ``forward``; one flattened all-reduce per step is exact for all of
them. Backend ``nccl`` on CUDA, ``gloo`` on CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked; errors name ``key`` (the recipe
    key or the command-line option the name came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} was asked for but no CUDA device is available here; use auto or cpu")
    return device


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size`` (1 and 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Dist()
_created = False  # whether this module started the process group (and so may end it)


def init_distributed(device_type: str) -> Dist:
    """Join the process group that torchrun describes in the environment; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    global _created
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend)
        else:  # under torchrun: keys of this attempt only, or a restarted worker may read a dead one's address
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"bindkit/attempt-{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        _created = True
    log.info("rank %d of %d (backend %s)", rank, world_size, dist.get_backend())
    return Dist(rank, world_size, local_rank)


def shutdown_distributed() -> None:
    """Leave the process group, if :func:`init_distributed` created it (a caller's own group stays)."""
    global _created
    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``(n, ...)`` tensors concatenated in rank order; backward returns this rank's rows.

    Every rank's loss depends on every rank's rows, so the gradient of this rank's rows is the
    *sum* over ranks of the gradients flowing into them: an all-reduce of the whole gradient, then
    a slice (reduce-scatter would move less data, but gloo does not implement it).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks; gradients flow back to each rank's rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if tensor.requires_grad:
        return _GatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flattened all-reduce (every rank runs the same code, so the
    same parameters have a gradient; one without stays without)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        if p.grad is not None:
            p.grad.copy_(g)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all start from the same weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a scalar over ranks (for logging a loss that each rank computed on its own rows)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launch(nproc: int, argv: list[str], debug: bool = False) -> int:
    """``bindkit run ... --nproc N``: run ``python -m bind ARGV`` on N processes of this machine, as torchrun does.

    Each failing process prints its own one-line error; torchrun's report of the failure (a long traceback)
    becomes one line, or shows in full with ``debug``. Returns the first failure's exit code (0: all finished)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "bind", *argv]))
    except ChildFailedError as err:
        if debug:
            raise
        rank, failure = err.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        print(
            f"bindkit run: error: {len(err.failures)} of {nproc} processes failed, first rank {rank} ({how}); "
            "its error is above (--debug: torchrun's full report)",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def check_nproc(nproc: int) -> None:
    """Refuse, in one line, more processes than this machine has devices for: one GPU per process on CUDA,
    at most one process per CPU core without one."""

    if nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1, got {nproc}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc}: this machine has {gpus} CUDA device(s) and each process takes one; use --nproc {gpus} "
            "or fewer (several machines: torchrun --nnodes, see README)"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not gpus and nproc > cores:
        raise ConfigError(
            f"--nproc {nproc}: no CUDA device and {cores} CPU core(s) here; processes beyond the cores only slow "
            f"each other down: use --nproc {cores} or fewer"
        )
