"""The trainer end to end on a smoke-size digits run, plus its schedule and reproducibility."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DIGITS, SMOKE

from bind.model import BindModel
from bind.optim import param_groups, warmup_cosine
from bind.recipe import OptimSpec, load_recipe
from bind.trainer import run_recipe


def test_warmup_then_cosine():
    f = warmup_cosine(OptimSpec(warmup_steps=4, min_lr_ratio=0.1), total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_scales():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(list(model.parameters()), 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_smoke_digits_run_writes_a_complete_loadable_run(tmp_path, data_root):
    recipe = load_recipe(DIGITS, [*SMOKE, f"data_root={data_root}"])
    results = run_recipe(recipe, tmp_path, show_progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "recipe.yaml",
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "eval.json",
        "checkpoints",
    }
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["zero_shot"]) == {"image", "audio", "video"}
    assert saved["zero_shot"]["audio"]["pair"] == "emergent" and saved["zero_shot"]["image"]["pair"] == "trained"
    assert saved["retrieval"]["audio->video"]["pair"] == "emergent"
    assert saved["retrieval"]["audio->image"]["pair"] == "trained"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if "step" in r] == ["image_specialist", "audio_specialist", "bind"]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    model = BindModel.from_pretrained(tmp_path).eval()
    assert model["image"].frozen  # the anchor was frozen for binding and is saved so
    z = model.embed("text", ["a handwritten seven"])
    assert z.shape == (1, 16)
    # the video tower's frame encoder is the image tower, tied, after loading too
    assert model["video"].frame_encoder.trunk is model["image"].trunk


def test_same_seed_same_weights_on_cpu(tmp_path, data_root):
    overrides = [
        *SMOKE,
        f"data_root={data_root}",
        "eval.max_items=10",
        "stages=[{name: s, kind: pretrain, modality: audio, steps: 3, batch_size: 16}]",
    ]
    weights = []
    for name in ("a", "b"):
        run_recipe(load_recipe(DIGITS, overrides), tmp_path / name, show_progress=False)
        weights.append(BindModel.from_pretrained(tmp_path / name).state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_a_loader_that_gives_no_full_batch_is_an_error_not_an_endless_loop():
    from torch.utils.data import DataLoader

    from bind.data.loaders import endless
    from bind.errors import DataError

    with pytest.raises(DataError, match="gave no full batch of 4"):
        next(endless(DataLoader(list(range(3)), batch_size=4, drop_last=True)))


def test_bench_step_compares_every_stage_with_a_bare_loop(tmp_path, data_root):
    """The plumbing of `bindkit bench step` (its figures are measured by the benchmark, not here)."""
    import yaml

    from bind.bench import run_benchmark
    from bind.bench.ddp import check_recipe

    recipe = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    recipe["stages"].insert(
        0, {"name": "audio_alone", "kind": "pretrain", "modality": "audio", "batch_size": 8, "steps": 1}
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    result = run_benchmark("step", recipe=str(path), steps=2, warmup=1, overrides=["stages.1.steps=9"])
    assert list(result["stages"]) == ["audio_alone", "bind"] and result["overrides"] == ["stages.1.steps=9"]
    for stage in result["stages"].values():
        assert stage["trainer_samples_per_s"] > 0 and stage["bare_samples_per_s"] > 0
        assert 0 <= stage["data_wait_fraction"] <= 1 and stage["overhead"] < 1
