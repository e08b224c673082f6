"""``bindkit bench gpu``: FLOP counting, MFU arithmetic and the CPU path (no timing asserts)."""

from __future__ import annotations

import math

import pytest
import torch

from bind.bench.gpu import bench_gpu, mfu, peak_flops, step_flops


def test_step_flops_of_a_linear_layer_forward_and_backward():
    batch, d_in, d_out = 8, 16, 32
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(batch, d_in, requires_grad=True)
    # forward 2*B*in*out; backward the same again for the weight grad and for the input grad
    assert step_flops(lambda: layer(x).sum().backward()) == 6 * batch * d_in * d_out


def test_mfu_is_none_for_an_unknown_card_and_the_ratio_for_a_known_one():
    assert mfu(1e12, 1.0, "Some Future GPU") is None
    assert peak_flops("NVIDIA L40S") is None  # not the L4
    assert mfu(989e12 / 2, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    assert mfu(756e12, 0.25, "NVIDIA H100 PCIe") == pytest.approx(0.25)
    assert mfu(156e12, 1.0, "NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cpu_run_reports_smoke_figures_and_pending_gpu_figures():
    result = bench_gpu(run_tests=False, tiny=True, steps=1, batch_size=4)
    assert result["device"] == "cpu" and result["gpu"] is None
    assert "pending" in result["note"]
    assert result["samples_per_s_bf16"] is None and result["mfu_bf16"] is None
    assert result["batch_size"] == 4
    for mode in ("fp32", "bf16"):
        assert (
            math.isfinite(result[f"cpu_smoke_samples_per_s_{mode}"]) and result[f"cpu_smoke_samples_per_s_{mode}"] > 0
        )
    assert result["cpu_smoke_flops_per_step"] > 0
    assert not torch.backends.cuda.matmul.allow_tf32  # restored


def test_a_vit_b16_and_bert_base_step_counts_about_139_gflops_per_sample(tmp_path):
    """The figure MFU divides by: ViT-B/16 at 224 px (17.6 GMACs forward) and BERT-base over 64 tokens, forward
    and backward (3x forward), is about 139 GFLOPs per sample (the issue's reference). The image tower is
    counted on the meta device (shapes only); BERT runs for real, one sample."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bind.bench.gpu import FULL, VOCAB, _towers

    image, text = _towers(str(tmp_path), FULL, 64)
    image = image.to("meta")
    pixels = torch.randn(1, 3, 224, 224, device="meta")
    tokens = {"input_ids": torch.randint(0, VOCAB, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    with sdpa_kernel(SDPBackend.MATH):  # plain matmuls, which the counter has formulas for
        flops = step_flops(lambda: image(pixels).sum().backward()) + step_flops(lambda: text(tokens).sum().backward())
    assert flops / 1e9 == pytest.approx(139, rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_skipped_gpu_checks_are_reported_as_not_run_not_as_passed():
    from bind.bench.gpu import run_cuda_tests

    result = run_cuda_tests()
    assert result["verdict"].startswith("NOT RUN:") and "needs a CUDA device" in result["verdict"]
    assert result["passed"] == 0 and result["skipped"] == len(result["checks"]) >= 8
    assert set(result["checks"].values()) == {"SKIPPED"}
    assert "test_an_nccl_group_of_one_gives_the_steps_gradients_of_no_group" in result["checks"]
