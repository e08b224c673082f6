"""Data-parallel training with ``torch.distributed``: one process per device, global negatives.

``torchrun --nproc_per_node N -m bind run RECIPE`` (or ``bindkit run RECIPE --nproc N``) starts N
processes; each reads its rank from the environment torchrun sets. Every rank takes its own
contiguous slice of each global batch (:class:`bind.data.pairs.EpochSampler` with ``rank``), embeds
it, and :func:`gather_with_grad` concatenates the embeddings of all ranks *with* their gradient
path, so every rank's contrastive loss sees the negatives of the whole global batch (as CLIP and
open_clip do). With ``local_loss`` a rank scores only its own rows against all columns (open_clip's
``local_loss``): the same gradient, an ``(N/W) x N`` instead of ``N x N`` similarity matrix.

Gradients are averaged across ranks once per optimizer step by our own hooks, not by
``DistributedDataParallel``'s: a step may run several backward passes (GradCache chunks, gradient
accumulation) and towers with cached trunk features are called through ``embed_features``, not
``forward``. :func:`all_reduce_gradients` does it in one flattened all-reduce after the step's last
backward (simple, but the communication is exposed); :class:`GradientReducer` overlaps it with the
last backward, bucket by bucket. Backend ``nccl`` on CUDA, ``gloo`` on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def init_distributed(device_type: str, timeout_s: float | None = None) -> Dist:
    """Join the process group that torchrun describes in the environment; a no-op for a single process.

    ``timeout_s``: how long a collective may wait for the other ranks before the job fails (default: the
    backend's, 10 minutes for NCCL, too short for a long evaluation or checkpoint on one rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    global _created
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, **timeout)
        else:  # under torchrun: keys of this attempt only, or a restarted worker may read a dead one's address
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"bindkit/attempt-{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **timeout)
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
    if not dist.is_initialized():  # a group of one still runs its collectives: NCCL code tested on one GPU
        return tensor
    if tensor.requires_grad:
        return _GatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flattened all-reduce (every rank runs the same code, so the
    same parameters have a gradient; one without stays without)."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        if p.grad is not None:
            p.grad.copy_(g)


class GradientReducer:
    """Average ``.grad`` over ranks like :func:`all_reduce_gradients`, overlapped with the step's last backward.

    The parameters are cut into buckets of about ``bucket_bytes``, in reverse order of ``params`` (backward
    computes the last layers first), as DDP does. A hook on each parameter counts the gradients that arrive
    inside :meth:`armed` (the caller arms the last backward pass that touches each parameter); once all of a
    bucket's parameters have fired, the bucket's accumulated gradients are copied into one flat buffer and an
    asynchronous all-reduce (a sum) starts while backward goes on. Buckets start strictly in bucket order,
    so every rank issues the same collectives in the same order. :meth:`finish` starts the rest, waits, divides
    by the world size and writes the averages into ``.grad``.

    A gradient that accumulates into a parameter after its bucket started (armed or not: a trunk shared by two
    replayed towers) marks the bucket dirty; :meth:`finish` reduces it again from the current ``.grad``. So
    the result is exact whatever the caller arms; arming well only decides how much communication overlaps.
    A parameter that did not fire while armed in the last armed step is not waited for in the next (the
    anchor's unused logit scale would otherwise hold back its bucket and every later one); should it get a
    gradient after all, its bucket is dirty and reduced again. Every rank runs the same code on the same
    graph, so the hooks fire alike and these decisions agree on all ranks.

    Each bucket's buffer is a copy of its gradients (one extra gradient's worth of memory). A no-op without
    hooks when ``torch.distributed`` is not initialized."""

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int = 25 * 2**20) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.buckets: list[list[torch.nn.Parameter]] = []
        self._handles: list[Any] = []
        self._armed = False
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        if not dist.is_initialized():  # a group of one still reduces (an identity): its code runs on one GPU
            return
        unique = {id(p): p for p in params if p.requires_grad}  # a frozen parameter never gets a gradient
        size, key = 0, None
        for p in reversed(list(unique.values())):
            # one dtype and device per bucket: its gradients are flattened into one buffer
            if not self.buckets or size >= bucket_bytes or (p.dtype, p.device) != key:
                self.buckets.append([])
                size, key = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = [b for b, bucket in enumerate(self.buckets) for _ in bucket]
        self._expected = [True] * len(self._bucket_of)  # waited for while armed (see the class docstring)
        for i, p in enumerate(p for bucket in self.buckets for p in bucket):
            self._handles.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._fired(i)))
        self._reset()

    def _reset(self) -> None:
        self._seen = [False] * len(self._bucket_of)  # fired while armed this step
        self._waiting = [0] * len(self.buckets)  # expected parameters not yet seen, per bucket
        for i, b in enumerate(self._bucket_of):
            self._waiting[b] += self._expected[i]
        self._started: list[tuple[Any, Tensor] | None] = [None] * len(self.buckets)
        self._stale: list[tuple[Any, Tensor]] = []  # collectives of dirty buckets, waited for before dropping
        self._dirty = [False] * len(self.buckets)
        self._next = 0  # the first bucket not started yet

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Gradients accumulated inside this block are the step's last for their parameters."""
        before, self._armed = self._armed, True
        try:
            yield
        finally:
            self._armed = before

    def _fired(self, i: int) -> None:
        b = self._bucket_of[i]
        if self._started[b] is not None:
            self._dirty[b] = True  # the buffer in flight misses this gradient
            return
        if not self._armed or self._seen[i]:
            return
        self._seen[i] = True
        self._waiting[b] -= self._expected[i]
        while self._next < len(self.buckets) and self._waiting[self._next] <= 0:
            self._start(self._next)

    def _start(self, b: int) -> None:
        """All-reduce (sum) a copy of bucket ``b``'s accumulated gradients, asynchronously."""
        grads = []
        for p in self.buckets[b]:
            if p.grad is not None and p.grad.layout != torch.strided:
                raise ValueError(f"GradientReducer: a {p.grad.layout} gradient cannot be bucketed; use dense gradients")
            grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1))
        flat = torch.cat(grads)  # a copy, also of a single gradient (.grad keeps accumulating beside it)
        self._started[b] = (dist.all_reduce(flat, async_op=True), flat)
        self._next = max(self._next, b + 1)

    def finish(self) -> None:
        """After the step's last backward: start what is left and re-reduce dirty buckets (in bucket order),
        wait, and write the averages into ``.grad`` (a parameter without gradient stays without)."""
        if not self.buckets:
            return
        try:
            for b in range(len(self.buckets)):
                if self._started[b] is None:
                    self._start(b)
                elif self._dirty[b]:
                    self._stale.append(self._started[b])
                    self._start(b)
            for work, _ in self._stale:
                work.wait()
            for bucket, started in zip(self.buckets, self._started, strict=True):
                work, flat = started
                work.wait()
                flat /= self._world
                with torch.no_grad():
                    for p, avg in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                        if p.grad is not None:
                            p.grad.copy_(avg.view_as(p.grad))
            if any(self._seen):  # a step that armed nothing says nothing about which parameters fire
                self._expected = list(self._seen)
        finally:
            self._reset()

    def remove(self) -> None:
        """Remove the hooks (after waiting for any all-reduce still in flight); the reducer does nothing after."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.buckets:
            for started in [*self._stale, *self._started]:
                if started is not None:
                    started[0].wait()
        self.buckets = []


def sync_batchnorm_stats(module: torch.nn.Module) -> None:
    """Average the running mean and variance of every BatchNorm in training mode over ranks (timm's
    ``distribute_bn`` "reduce"), so evaluation and the saved model use all ranks' statistics rather than
    rank 0's. A frozen BatchNorm stays in eval mode (:meth:`bind.ModalityEncoder.train`): its statistics are
    the same on every rank and are left exactly so. ``num_batches_tracked`` is the same on every rank too."""
    if not dist.is_initialized():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:  # no running stats: None
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for tensors in groups.values():  # one all-reduce per dtype and device, in module order on every rank
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for t, avg in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.copy_(avg.view_as(t))


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all start from the same weights."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mean_over_ranks(values: Tensor) -> Tensor:
    """The mean over ranks of ``values`` (a loss each rank computed on its own rows), left on the device: the
    all-reduce is queued and no host waits for it."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


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
