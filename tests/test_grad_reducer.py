"""GradientReducer: bucketed all-reduce overlapped with backward, equal to the mean of the ranks' gradients.

The multi-process checks run in one spawn of 2 gloo processes; each check asserts inside the workers, and a
failing assertion comes back as the spawn's error with the worker's traceback.
"""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from torch import nn

import bind.distributed as bd
from bind.distributed import GradientReducer, all_reduce_gradients, sync_batchnorm_stats

WORLD = 2


class Launches:
    """Wraps ``dist.all_reduce`` (which the reducer calls through the module) to log each launch between other
    events, so a test can see when a bucket started relative to backward."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.original = dist.all_reduce

    def __enter__(self) -> Launches:
        def logged(tensor, *args, **kwargs):
            self.events.append(("launch", tensor.numel()))
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = logged
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original

    def note(self, what: str) -> None:
        self.events.append((what, 0))

    def sizes(self) -> list[int]:
        return [n for what, n in self.events if what == "launch"]


def local_grads(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def rank_mean(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The mean over ranks of each local gradient, from an all_gather (independent of the reducer's arithmetic)."""
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        parts = [torch.empty_like(g) for _ in range(WORLD)]
        dist.all_gather(parts, g)
        assert not torch.equal(parts[0], parts[1]), "ranks must differ, or any average would pass"
        out.append(sum(parts) / WORLD)
    return out


def assert_grads(params: list[nn.Parameter], expected: list[torch.Tensor | None]) -> None:
    for i, (p, e) in enumerate(zip(params, expected, strict=True)):
        if e is None:
            assert p.grad is None, f"param {i} got a gradient"
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7, msg=f"param {i}")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def data(rank: int, n: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(100 + rank))


def check_accumulation_overlap_and_order(rank: int) -> None:
    """Two micro-batches, the second armed: the mean of both micro-batches' gradients, with buckets started
    during the armed backward, in bucket order, once each."""
    model = mlp()
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    reducer = GradientReducer(params, bucket_bytes=100)  # several buckets, some of two parameters
    assert len(reducer.buckets) >= 3 and any(len(b) == 2 for b in reducer.buckets)
    assert reducer.buckets[0][0] is params[-1]  # the last layer's parameters first
    x1, x2 = data(rank).split([2, 3])
    first = model[0]
    with Launches() as log:
        for p in first.parameters():  # registered after the reducer's: runs after its hook on the same param
            p.register_post_accumulate_grad_hook(lambda _p: log.note("first layer grad"))
        model(x1).square().sum().backward()
        assert log.sizes() == [], "an unarmed backward must not start buckets"
        log.events.clear()
        with reducer.armed():
            model(x2).square().sum().backward()
        kinds = [what for what, _ in log.events]
        assert kinds[0] == "launch", f"the first bucket must start while backward still runs: {kinds}"
        assert len(log.sizes()) == len(reducer.buckets)  # every parameter fired: all started from hooks
        expected = rank_mean(local_grads(params))
        reducer.finish()
    assert log.sizes() == [sum(p.numel() for p in b) for b in reducer.buckets]  # in bucket order, none twice
    assert_grads(params, expected)
    # the same as the one flat all-reduce, to float rounding
    reference(x1).square().sum().backward()
    reference(x2).square().sum().backward()
    all_reduce_gradients(list(reference.parameters()))
    assert_grads(params, [p.grad for p in reference.parameters()])


def check_dirty_shared_trunk_and_unarmed_step(rank: int) -> None:
    """A trunk used by two towers, each backward armed: the trunk's bucket starts after the first and gets more
    gradient in the second, so it must be reduced again. Then a step that arms nothing still reduces all."""
    torch.manual_seed(1)
    trunk, head_a, head_b = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 2)
    # head_b's buckets last: not touched by the first backward, they must not hold back the trunk's
    params = [*head_b.parameters(), *trunk.parameters(), *head_a.parameters()]
    reducer = GradientReducer(params, bucket_bytes=1)  # one bucket per parameter
    x = data(rank)
    with Launches() as log:
        with reducer.armed():
            head_a(trunk(x)).square().sum().backward()
        trunk_sizes = [p.numel() for p in reversed(list(trunk.parameters()))]
        assert log.sizes()[-2:] == trunk_sizes, "the test needs the trunk's buckets started before its 2nd grad"
        with reducer.armed():
            head_b(trunk(x)).sin().sum().backward()
        expected = rank_mean(local_grads(params))
        reducer.finish()
    assert len(log.sizes()) > len(reducer.buckets)  # the dirty buckets went again
    assert_grads(params, expected)

    for p in params:
        p.grad = None
    with Launches() as log:
        head_b(trunk(x)).square().sum().backward()  # nothing armed
        assert log.sizes() == []
        expected = rank_mean(local_grads(params))
        reducer.finish()
    assert len(log.sizes()) == len(reducer.buckets)  # fresh per step: the previous step's launches are gone
    assert_grads(params, expected)
    # arming only the first tower: the second's gradient reaches the started trunk unarmed, still counted
    for p in params:
        p.grad = None
    with Launches() as log:
        with reducer.armed():
            head_a(trunk(x)).square().sum().backward()
        head_b(trunk(x)).sin().sum().backward()
        expected = rank_mean(local_grads(params))
        reducer.finish()
    assert_grads(params, expected)
    # only the trunk's 2 buckets twice: the unarmed step before did not make head_b's look unused
    assert len(log.sizes()) == len(reducer.buckets) + 2

    reducer.remove()
    with Launches() as log:
        with reducer.armed():
            head_a(trunk(x)).sum().backward()
        reducer.finish()
    assert log.sizes() == []  # no hooks left, nothing to finish


class Holder(nn.Module):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.p = nn.Parameter(tensor)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lonely = Holder(torch.ones(40))  # alone in the last bucket: no gradient in the whole bucket
        self.l1 = nn.Linear(4, 3)
        self.unused = Holder(torch.ones(3))  # shares a bucket with l1's parameters
        self.l2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, use: bool = False) -> torch.Tensor:
        out = self.l2(torch.tanh(self.l1(x))).square().sum()
        return out + (self.unused.p * x[0, :3]).sum() if use else out


def check_parameters_without_gradient(rank: int) -> None:
    """A parameter without gradient stays None, and its bucket-mates are averaged. After a step in which it did
    not fire it no longer holds back the buckets; when it gets a gradient again it is still averaged."""
    model = WithUnused()
    params = list(model.parameters())
    reducer = GradientReducer(params, bucket_bytes=30)
    lonely, unused = model.lonely.p, model.unused.p
    assert len(reducer.buckets) == 3 and len(reducer.buckets[-1]) == 1 and reducer.buckets[-1][0] is lonely
    assert [id(p) for p in reducer.buckets[1]] == [id(unused), id(model.l1.bias), id(model.l1.weight)]
    x = data(rank)
    for step, use in enumerate([False, False, True]):
        for p in params:
            p.grad = None
        with Launches() as log:
            with reducer.armed():
                model(x, use).backward()
            during_backward = len(log.sizes())
            expected = rank_mean(local_grads(params))
            reducer.finish()
        assert_grads(params, expected)
        assert lonely.grad is None
        assert (unused.grad is None) != use
        if step == 0:  # `unused` holds back its bucket and the later ones: they start at finish
            assert during_backward < len(reducer.buckets) - 1
        if step == 1:  # it did not fire last step: not waited for, all buckets start during backward
            assert during_backward == len(reducer.buckets)


def check_sync_batchnorm_stats(rank: int) -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(2)), nn.BatchNorm1d(3, track_running_stats=False)
    )
    norms = [model[0], model[1][0]]
    local = []
    for k, bn in enumerate(norms):
        bn.running_mean.copy_(torch.arange(bn.num_features) + 10.0 * rank + k)
        bn.running_var.copy_(torch.arange(bn.num_features) * (rank + 1.0) + 1)
        bn.num_batches_tracked.fill_(7 + rank)
        local.append((bn.running_mean.clone(), bn.running_var.clone()))
    expected = rank_mean([t for pair in local for t in pair])
    sync_batchnorm_stats(model)
    for k, bn in enumerate(norms):
        torch.testing.assert_close(bn.running_mean, expected[2 * k])
        torch.testing.assert_close(bn.running_var, expected[2 * k + 1])
        assert bn.num_batches_tracked.item() == 7 + rank  # left alone


def _worker(rank: int, dist: bd.Dist) -> None:
    check_accumulation_overlap_and_order(rank)
    check_dirty_shared_trunk_and_unarmed_step(rank)
    check_parameters_without_gradient(rank)
    check_sync_batchnorm_stats(rank)


def test_two_gloo_processes_average_gradients_overlapped_with_backward():
    spawn_gloo(_worker, nprocs=WORLD)


def test_single_process_reducer_leaves_the_gradients_as_they_are(tmp_path, monkeypatch):
    def no_collectives(*args, **kwargs):
        raise AssertionError("no collective on one process")

    def step_and_finish(model: nn.Module, group_of_one: bool = False) -> list[torch.Tensor]:
        reducer = GradientReducer(list(model.parameters()), bucket_bytes=1)
        assert (reducer.buckets != []) == group_of_one  # a group of one runs its (identity) collectives
        if not group_of_one:
            monkeypatch.setattr(dist, "all_reduce", no_collectives)
        with reducer.armed():
            model(data(0)).sum().backward()
        before = local_grads(list(model.parameters()))
        reducer.finish()
        sync_batchnorm_stats(model)
        reducer.remove()
        monkeypatch.undo()
        return before

    assert not dist.is_initialized()
    model = mlp()
    before = step_and_finish(model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))

    # a process group of one (how a one-GPU machine tests the NCCL code): the collectives run, the grads stay
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = mlp()
        before = step_and_finish(model, group_of_one=True)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("restart", [None, "1"])
def test_init_distributed_passes_the_timeout_on(monkeypatch, restart):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 0, 2)]))
    monkeypatch.setattr(bd, "_created", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    if restart is None:
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
    bd.init_distributed("cpu", timeout_s=1800)
    bd.init_distributed("cpu")
    assert calls[0]["timeout"] == datetime.timedelta(seconds=1800)
    assert "timeout" not in calls[1]  # the backend's default
