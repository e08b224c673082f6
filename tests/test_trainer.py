"""The trainer end to end on a smoke-size digits run, plus its schedule and reproducibility."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DIGITS, SMOKE

from bind.model import BindModel
from bind.recipe import OptimSpec, load_recipe
from bind.train.optim import param_groups, warmup_cosine
from bind.train.trainer import run_recipe


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

    from bind.errors import DataError
    from bind.train.loaders import endless

    with pytest.raises(DataError, match="gave no full batch of 4"):
        next(endless(DataLoader(list(range(3)), batch_size=4, drop_last=True)))


def test_prepare_model_puts_the_model_on_the_device_with_convolutions_channels_last(data_root):
    """What the trainer and `bindkit bench step` train: on the device (the meta device here: shapes only), and
    with ``channels_last`` each Conv2d weight NHWC."""
    from bind.bench.ddp import check_recipe
    from bind.recipe import parse_recipe
    from bind.train.trainer import prepare_model

    data = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None) | {"channels_last": True}
    data["modalities"]["image"]["args"]["width"] = 8
    model = prepare_model(parse_recipe(data), torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(c.weight.is_contiguous() for c in convs)


def test_bench_step_compares_every_stage_with_a_bare_loop(tmp_path, data_root, monkeypatch):
    """The plumbing of `bindkit bench step` (its figures are measured by the benchmark, not here)."""
    import yaml

    import bind.train.trainer as trainer
    from bind.bench import run_benchmark
    from bind.bench.ddp import check_recipe

    prepared = []  # the model bench step trains is the trainer's: prepared on the recipe's device
    real = trainer.prepare_model
    monkeypatch.setattr(trainer, "prepare_model", lambda spec, device: prepared.append(device) or real(spec, device))

    recipe = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    recipe["stages"].insert(
        0, {"name": "audio_alone", "kind": "pretrain", "modality": "audio", "batch_size": 8, "steps": 1}
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    result = run_benchmark("step", recipe=str(path), steps=2, warmup=1, overrides=["stages.1.steps=9"])
    assert list(result["stages"]) == ["audio_alone", "bind"] and result["overrides"] == ["stages.1.steps=9"]
    assert prepared == [torch.device("cpu")]
    for stage in result["stages"].values():
        assert stage["trainer_samples_per_s"] > 0 and stage["bare_samples_per_s"] > 0
        assert 0 <= stage["data_wait_fraction"] <= 1 and stage["overhead"] < 1


def test_a_pairs_weight_scales_its_share_of_the_loss_and_of_the_gradient(data_root):
    """Weight 0.25 on the audio pair: the step's loss (what is backpropagated and what is logged) and every
    gradient are 0.25 x those of the pair's InfoNCE, computed here from its definition on the same batch."""
    import torch.nn.functional as F

    from bind.bench.ddp import check_recipe
    from bind.data import build_dataset
    from bind.recipe import parse_recipe
    from bind.train.stage import StageRunner
    from bind.train.trainer import build_model, seed_everything

    weight = 0.25
    data = check_recipe(str(data_root), 16, local_loss=False, chunk_size=None)
    data["stages"][0]["pairs"]["audio"] |= {"weight": weight, "loss": "info_nce"}
    recipe = parse_recipe(data)
    seed_everything(0)
    model = build_model(recipe)
    train_sets = {m: build_dataset(s.train_data, recipe.data_root) for m, s in recipe.modalities.items()}
    runner = StageRunner(model, recipe, recipe.stages[0], torch.device("cpu"), train_sets)
    batches = {m: next(iterator) for m, iterator in runner.data.iterators().items()}

    loss, parts, _ = runner.backward({m: iter([batch]) for m, batch in batches.items()})
    grads = [p.grad.clone() for p in runner.params]

    anchor_x, x, _, _ = batches["audio"]
    z_audio, z_image = runner.towers["audio"](x), runner.towers["image"](anchor_x)  # no dropout: the same forward
    logits = model["audio"].logit_scale * z_audio @ z_image.T
    targets = torch.arange(len(logits))
    pair_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    expected_grads = torch.autograd.grad(weight * pair_loss, runner.params)

    assert parts["audio"] == pytest.approx(pair_loss.item(), rel=1e-5)  # the part is the pair's own loss
    assert loss == pytest.approx(weight * pair_loss.item(), rel=1e-5)
    assert len(grads) > 1 and all(g.abs().sum() > 0 for g in grads)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))  # float32 sums


def test_num_workers_0_and_2_train_the_same_weights_with_augmentation(tmp_path, data_root):
    """README: a run is the same whatever the number of DataLoader workers. Audio is augmented (speed, noise) and
    dropped out in both stages, so every random draw of preprocessing runs in the workers with num_workers=2."""
    from test_resume import tiny_recipe

    from bind.recipe import parse_recipe
    from bind.train.trainer import build_model, seed_everything

    weights = []
    for workers in (0, 2):
        data = tiny_recipe(data_root)
        data |= {"num_workers": workers, "checkpoint_every": None}
        data["stages"][0]["steps"], data["stages"][1]["steps"] = 2, 2
        for modality in data["modalities"].values():
            modality.pop("eval_data")  # the weights are the point; no evaluation
            modality["train_data"]["args"]["limit"] = 64  # every digit, in a few seconds
        assert data["modalities"]["audio"]["train_data"]["augment"]
        run_recipe(parse_recipe(data), tmp_path / str(workers), show_progress=False)
        weights.append(BindModel.from_pretrained(tmp_path / str(workers)).state_dict())
    seed_everything(data["seed"])
    initial = build_model(parse_recipe(data)).state_dict()
    assert weights[0].keys() == weights[1].keys() == initial.keys()
    assert not all(torch.equal(weights[0][key], initial[key]) for key in initial)  # it trained: equal is not trivial
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key  # bitwise


def test_learnable_logit_scales_are_clamped_to_1_and_the_maximum_and_fixed_ones_left_alone():
    """After a step a learnable scale stays in [1, max_logit_scale] (CLIP clamps its at 100); a fixed one is not
    touched, whatever its value."""
    from bind import create_encoder
    from bind.train.optim import clamp_logit_scales

    learnable = create_encoder("audio_cnn", width=4, embed_dim=8)
    learnable.log_logit_scale.requires_grad_(True)  # what learnable_logit_scale=True gives
    model = BindModel({"audio": learnable}, anchor_modality="audio")
    for value, expected in [(-3.0, 1.0), (0.5, float(torch.tensor(0.5).exp())), (50.0, learnable.max_logit_scale)]:
        with torch.no_grad():
            learnable.log_logit_scale.fill_(value)
        clamp_logit_scales(model)
        assert float(learnable.log_logit_scale.detach().exp()) == pytest.approx(expected, rel=1e-6)
    learnable.log_logit_scale.requires_grad_(False)
    with torch.no_grad():
        learnable.log_logit_scale.fill_(-3.0)
    clamp_logit_scales(model)
    assert float(learnable.log_logit_scale) == -3.0


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", True), ("auto", True)])
def test_precision_decides_tf32_on_cuda_and_cudnn_benchmarks_convolutions(precision, tf32):
    """fp32 means float32 (TF32 off: torch's cuDNN default would be on); the flags are process-wide settings,
    so they can be read without a GPU. On the CPU nothing changes."""
    from bind.train.trainer import configure_backends

    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    saved = [(o, n, getattr(o, n)) for o, n in [*flags, (torch.backends.cudnn, "benchmark")]]
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
        torch.backends.cudnn.benchmark = False
        configure_backends(precision, torch.device("cpu"))
        assert [getattr(o, n) for o, n in flags] == [not tf32] * 2 and not torch.backends.cudnn.benchmark
        configure_backends(precision, torch.device("cuda"))
        assert [getattr(o, n) for o, n in flags] == [tf32] * 2 and torch.backends.cudnn.benchmark
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
