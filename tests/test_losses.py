"""Each loss against a plain loop-based reference, gradients by gradcheck in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bind.losses import get_loss, info_nce, label_aware_info_nce, pairwise_cosine_loss, supcon_loss


def unit(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


# ---- references: one row at a time, straight from the definitions --------------------------------
def ref_info_nce(a, b, scale):
    n = len(a)
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(a[j] @ b[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return total / (2 * n)


def ref_label_aware(a, b, la, lb, scale):
    def one_direction(x, y, lx, ly):
        losses = []
        for i in range(len(x)):
            logits = [scale * float(x[i] @ y[j]) for j in range(len(y))]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(len(y)) if lx[i] == ly[j]]
            if pos:
                losses.append(-sum(logits[j] - lse for j in pos) / len(pos))
        return sum(losses) / len(losses)

    return (one_direction(a, b, la, lb) + one_direction(b, a, lb, la)) / 2


def ref_supcon(z, labels, temperature):
    losses = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        logits = {j: float(z[i] @ z[j]) / temperature for j in others}
        lse = math.log(sum(math.exp(v) for v in logits.values()))
        pos = [j for j in others if labels[j] == labels[i]]
        if pos:
            losses.append(-sum(logits[j] - lse for j in pos) / len(pos))
    return sum(losses) / len(losses)


def ref_pairwise(a, b, same):
    total = 0.0
    for i in range(len(a)):
        cos = float(a[i] @ b[i]) / (float(a[i].norm()) * float(b[i].norm()))
        total += (cos - float(same[i])) ** 2
    return total / len(a)


# ---- values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_info_nce_matches_reference(seed):
    a, b = unit(12, 8, seed), unit(12, 8, seed + 100)
    assert info_nce(a, b, 14.3).item() == pytest.approx(ref_info_nce(a, b, 14.3), abs=1e-6)


def test_info_nce_is_low_for_aligned_pairs_and_symmetric():
    a = unit(16, 32, 0)
    noise = unit(16, 32, 1)
    assert info_nce(a, a, 50.0) < info_nce(a, noise, 50.0)
    assert info_nce(a, noise, 10.0).item() == pytest.approx(info_nce(noise, a, 10.0).item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_aware_matches_reference(seed):
    a, b = unit(10, 6, seed), unit(14, 6, seed + 7)
    g = torch.Generator().manual_seed(seed)
    la, lb = torch.randint(0, 4, (10,), generator=g), torch.randint(0, 5, (14,), generator=g)
    got = label_aware_info_nce(a, b, la, lb, 9.0).item()
    assert got == pytest.approx(ref_label_aware(a, b, la.tolist(), lb.tolist(), 9.0), abs=1e-6)


def test_label_aware_with_distinct_labels_is_info_nce():
    a, b = unit(9, 5, 3), unit(9, 5, 4)
    labels = torch.arange(9)
    assert label_aware_info_nce(a, b, labels, labels, 7.0).item() == pytest.approx(info_nce(a, b, 7.0).item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_supcon_matches_reference(seed):
    z = unit(15, 8, seed)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 0, 2, 6, 7])  # 6 and 7 have no positive
    got = supcon_loss(z, labels, temperature=0.2).item()
    assert got == pytest.approx(ref_supcon(z, labels.tolist(), 0.2), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_pairwise_cosine_matches_reference(seed):
    a, b = torch.randn(11, 5), torch.randn(11, 5)  # not normalised: the loss uses cosine similarity
    same = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    assert pairwise_cosine_loss(a, b, same).item() == pytest.approx(ref_pairwise(a, b, same), abs=1e-6)


def test_logits_are_float32_under_bf16_autocast():
    a, b = unit(8, 4, 0).bfloat16(), unit(8, 4, 1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(a, b, 20.0)
    assert loss.dtype == torch.float32


# ---- gradients ---------------------------------------------------------------------------------------
def test_gradcheck_info_nce():
    a, b = unit(6, 4, 0, torch.float64).requires_grad_(), unit(6, 4, 1, torch.float64).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: info_nce(x, y, s), (a, b, scale))


def test_gradcheck_label_aware_and_supcon_and_pairwise():
    a, b = unit(7, 3, 2, torch.float64).requires_grad_(), unit(5, 3, 3, torch.float64).requires_grad_()
    la, lb = torch.tensor([0, 1, 1, 2, 3, 0, 9]), torch.tensor([0, 1, 2, 2, 3])
    assert torch.autograd.gradcheck(lambda x, y: label_aware_info_nce(x, y, la, lb, 4.0), (a, b))
    z = unit(8, 3, 4, torch.float64).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, 0.5), (z,))
    x, y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True), torch.randn(6, 3, dtype=torch.float64)
    same = torch.tensor([1, 0, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda p: pairwise_cosine_loss(p, y, same), (x,))


@pytest.mark.parametrize("loss_name", ["info_nce", "label_aware_info_nce"])
def test_local_rows_average_to_the_full_loss_and_gradient(loss_name):
    # data-parallel local loss: each of 3 "ranks" scores its 4 rows against all 12 columns
    torch.manual_seed(0)
    a = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 2, 2, 0, 3, 1, 0])

    def loss(rows=None):
        if loss_name == "info_nce":
            return info_nce(a, b, 10.0, rows=rows)
        return label_aware_info_nce(a, b, labels, labels, 10.0, rows=rows)

    full = loss()
    full_grads = torch.autograd.grad(full, (a, b))
    local = sum(loss(slice(r * 4, (r + 1) * 4)) for r in range(3)) / 3
    local_grads = torch.autograd.grad(local, (a, b))
    torch.testing.assert_close(local, full, atol=1e-12, rtol=0)
    for got, expected in zip(local_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_losses_without_any_positive_pair_are_zero_not_nan():
    """A batch where no label repeats (SupCon) or no label matches across sides: 0, as the reference gives,
    with a gradient of zeros, so the step is not counted as non-finite."""
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    supcon = supcon_loss(a, torch.arange(4))
    aware = label_aware_info_nce(a, b, torch.arange(4), torch.arange(10, 13), 10.0)
    for loss in (supcon, aware):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(grad).all() and grad.abs().max() == 0
    # one matched row still counts alone, as before
    some = label_aware_info_nce(a, b, torch.tensor([0, 1, 2, 3]), torch.tensor([3, 7, 8]), 10.0)
    assert torch.isfinite(some) and some.item() > 0


@pytest.mark.parametrize("loss_name", ["info_nce", "label_aware_info_nce"])
def test_the_whole_batch_takes_one_similarity_product_and_a_slice_takes_two(loss_name):
    """open_clip computes logits_per_text as logits_per_image.T: an N x N x D product once, not twice.
    FlopCounterMode counts what matmuls ran: 2 N^2 D for the one product (a slice of r rows: 2 x 2 r N D)."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d = 32, 16
    a, b = F.normalize(torch.randn(n, d), dim=-1), F.normalize(torch.randn(n, d), dim=-1)
    labels = torch.arange(n) % 5
    fn = get_loss(loss_name, "bind").fn
    counted = []
    for rows in (None, slice(0, 8)):
        with FlopCounterMode(display=False) as counter:
            fn(a, b, labels, logit_scale=torch.tensor(10.0), rows=rows)
        counted.append(counter.get_total_flops())
    assert counted == [2 * n * n * d, 2 * (2 * 8 * n * d)]
