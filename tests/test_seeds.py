"""Figures over seeds (bind/train/multiseed.py, ``bindkit run --seeds``): one run per seed, each figure's mean and spread."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import toy_plugin  # noqa: F401  (registers the toy encoders and the toy_clusters dataset)
import yaml

from bind.cli import main
from bind.train.multiseed import flatten_figures, summarize_seeds


def test_the_summary_is_the_mean_and_sample_spread_of_each_figure():
    per_seed = {
        0: {"prompt_modality": "t", "zero_shot": {"a": {"accuracy": 0.5, "pair": "emergent"}}},
        1: {"prompt_modality": "t", "zero_shot": {"a": {"accuracy": 0.7, "pair": "emergent"}}, "sets": {"s": {"x": 1}}},
        2: {"prompt_modality": "t", "zero_shot": {"a": {"accuracy": 0.9, "pair": "emergent"}}},
    }
    summary = summarize_seeds(per_seed)
    figure = summary["figures"]["zero_shot.a.accuracy"]
    assert figure["mean"] == pytest.approx(0.7) and figure["sd"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert (figure["min"], figure["max"], figure["values"]) == (0.5, 0.9, {"0": 0.5, "1": 0.7, "2": 0.9})
    assert summary["figures"]["sets.s.x"]["values"] == {"1": 1.0}  # only the seeds that report it
    assert set(flatten_figures(per_seed[0])) == {"zero_shot.a.accuracy"}  # text is no figure
    ranks = summarize_seeds({0: {"r": {"median_rank": math.inf}}, 1: {"r": {"median_rank": 3.0}}})["figures"]
    assert ranks["r.median_rank"]["mean"] == math.inf and math.isnan(ranks["r.median_rank"]["sd"])


def toy_recipe(tmp_path):
    view = lambda v, split: {"source": "toy_clusters", "split": split, "args": {"view": v}}  # noqa: E731
    recipe = {
        "anchor_modality": "toy_a",
        "embed_dim": 8,
        "device": "cpu",
        "modalities": {
            m: {"encoder": m, "train_data": view(v, "train"), "eval_data": view(v, "eval")}
            for m, v in (("toy_a", "a"), ("toy_b", "b"))
        },
        "stages": [
            {"name": "a", "kind": "pretrain", "modality": "toy_a", "loss": "supcon", "batch_size": 32, "steps": 5},
            {"name": "b", "kind": "bind", "pairs": {"toy_b": {"batch_size": 32}}, "steps": 5},
        ],
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_run_seeds_writes_one_run_per_seed_and_their_summary_and_resume_keeps_them(tmp_path, capsys):
    recipe, out = toy_recipe(tmp_path), tmp_path / "runs"
    argv = ["run", str(recipe), "--plugin", "toy_plugin", "--seeds", "3", "4", "--out", str(out), "--no-progress"]
    assert cli(argv) == 0
    per_seed = {s: json.loads((out / f"seed-{s}" / "eval.json").read_text()) for s in (3, 4)}
    assert per_seed[3] != per_seed[4]  # the seed reached the training
    summary = json.loads((out / "seeds.json").read_text())
    assert summary == json.loads(json.dumps(summarize_seeds(per_seed)))
    assert "over seeds 3, 4: mean +- sd" in capsys.readouterr().out
    before = (out / "seed-3" / "model.safetensors").stat().st_mtime_ns
    assert cli([*argv, "--resume"]) == 0  # both seeds are done: nothing trains again
    assert (out / "seed-3" / "model.safetensors").stat().st_mtime_ns == before
    assert "seed 3: evaluated already" in capsys.readouterr().out
    (out / "seed-4" / "eval.json").write_text("{not json")
    assert cli([*argv, "--resume"]) != 0
    assert "seed-4/eval.json: not a readable eval.json" in capsys.readouterr().err
    # a seed folder trained with another recipe (here: seed 3's run copied to seed-4) is refused, not averaged
    (out / "seed-4" / "eval.json").write_text(json.dumps(per_seed[4]))
    (out / "seed-4" / "recipe.yaml").write_text((out / "seed-3" / "recipe.yaml").read_text())
    assert cli([*argv, "--resume"]) != 0
    err = capsys.readouterr().err
    assert "seed-4 was run with another recipe (keys: seed)" in err and len(err.strip().splitlines()) == 1
    # a seed killed before its first checkpoint (only a temporary folder left) starts again under --resume
    shutil.rmtree(out / "seed-4")
    (out / "seed-4" / "checkpoints" / ".stage0-step5-tmp").mkdir(parents=True)
    (out / "seed-4" / "recipe.yaml").write_text((out / "seed-3" / "recipe.yaml").read_text())
    assert cli([*argv, "--resume"]) == 0
    assert json.loads((out / "seed-4" / "eval.json").read_text()) == per_seed[4]  # the same seed, the same figures
