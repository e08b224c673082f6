"""One freeze rule (bind.recipe.tower_freeze): what it decides, and that validation and the trainer both follow it."""

from __future__ import annotations

import pytest

from bind import ConfigError, build_model, parse_recipe
from bind.recipe import Freeze, tower_freeze
from bind.train.stage import apply_stage_freeze

DATA = {"source": "mnist"}  # never read: check_data=False


def recipe(image: dict | None = None, depth: dict | None = None, stages: list | None = None):
    data = {
        "anchor_modality": "image",
        "embed_dim": 8,
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": DATA, **(image or {})},
            "depth": {"encoder": "depth_cnn", "args": {"width": 4}, "train_data": DATA, **(depth or {})},
        },
        "stages": stages
        or [
            {"name": "pre", "kind": "pretrain", "modality": "depth", "steps": 1},
            {"name": "bind", "kind": "bind", "pairs": {"depth": {}}, "steps": 1},
        ],
    }
    return parse_recipe(data, check_data=False)


def test_assembled_towers_take_their_modality_setting():
    r = recipe(depth={"freeze": "trunk", "unfreeze_last_blocks": 2})
    assert tower_freeze(r, "depth") == Freeze("trunk", 2)
    assert tower_freeze(r, "image") == Freeze("none", 0)


def test_a_bind_stage_freezes_its_anchor_and_a_pretrain_stage_does_not():
    r = recipe()
    pretrain, bind_stage = r.stages
    assert tower_freeze(r, "image", bind_stage) == Freeze("all", 0)
    assert tower_freeze(r, "depth", bind_stage) == Freeze("none", 0)
    image_pretrain = recipe(stages=[{"name": "p", "kind": "pretrain", "modality": "image", "steps": 1}])
    assert tower_freeze(image_pretrain, "image", image_pretrain.stages[0]) == Freeze("none", 0)


def test_a_stage_override_keeps_the_blocks_a_modality_unfreezes():
    # the runner used to apply (part, 0) for any override, silently dropping unfreeze_last_blocks
    stages = [{"name": "b", "kind": "bind", "pairs": {"depth": {}}, "steps": 1, "freeze": {"depth": "trunk"}}]
    r = recipe(depth={"freeze": "trunk", "unfreeze_last_blocks": 1}, stages=stages)
    assert tower_freeze(r, "depth", r.stages[0]) == Freeze("trunk", 1)
    none = recipe(
        depth={"freeze": "trunk", "unfreeze_last_blocks": 1}, stages=[{**stages[0], "freeze": {"depth": "none"}}]
    )
    assert tower_freeze(none, "depth", none.stages[0]) == Freeze("none", 0)


def test_a_stage_may_unfreeze_the_anchor():
    stages = [{"name": "b", "kind": "bind", "pairs": {"depth": {}}, "steps": 1, "freeze": {"image": "trunk"}}]
    r = recipe(stages=stages)
    assert tower_freeze(r, "image", r.stages[0]) == Freeze("trunk", 0)


def test_lora_towers_train_adapters_not_the_trunk():
    stages = [{"name": "b", "kind": "bind", "pairs": {"depth": {}}, "steps": 1, "freeze": {"depth": "none"}}]
    r = recipe(depth={"lora": {"rank": 2}}, stages=stages)
    assert tower_freeze(r, "depth") == Freeze("trunk", 0)
    assert tower_freeze(r, "depth", r.stages[0]) == Freeze("trunk", 0)


def test_the_trainer_applies_what_the_rule_decides():
    stages = [{"name": "b", "kind": "bind", "pairs": {"depth": {}}, "steps": 1, "freeze": {"depth": "trunk"}}]
    r = recipe(depth={"freeze": "trunk", "unfreeze_last_blocks": 1}, stages=stages)
    model = build_model(r)
    apply_stage_freeze(model, r, r.stages[0])
    for modality in ("image", "depth"):
        encoder = model[modality]
        assert (encoder.frozen_part, encoder.unfreeze_last_blocks) == tower_freeze(r, modality, r.stages[0])
    depth = model["depth"]
    *frozen, last = depth.trunk_blocks()
    assert all(p.requires_grad for p in last.parameters())
    assert not any(p.requires_grad for block in frozen for p in block.parameters())
    assert all(p.requires_grad for p in depth.head.parameters())
    assert not any(p.requires_grad for p in model["image"].parameters())


def test_validation_refuses_a_stage_where_the_rule_freezes_everything():
    stages = [{"name": "b", "kind": "bind", "pairs": {"depth": {}}, "steps": 1, "freeze": {"depth": "all"}}]
    with pytest.raises(ConfigError, match=r"stages\[0\] \(b\): nothing would train: image, depth frozen 'all'"):
        recipe(stages=stages)
