"""Every registered loss learns: a stage run by StageRunner on a toy problem separates its classes, and the
same stage with the loss's sign flipped does not.

The toy problem (tests/toy_plugin.py) is two views of four classes, under nuisance dimensions that an
untrained tower mixes in. Pretrain losses train view b alone; bind losses bind view b to view a (first
pretrained with SupCon, then frozen as the anchor). A flipped loss is registered the way a plugin
registers its own, so these tests also show a loss added without touching bindkit.
"""

from __future__ import annotations

import pytest
import torch
import toy_plugin  # noqa: F401  (registers the toy encoders and the toy_clusters dataset)

from bind.data import build_dataset
from bind.evaluate import class_match_retrieval, class_prototypes, zero_shot_accuracy
from bind.losses import get_loss, list_losses, register_loss
from bind.recipe import parse_recipe
from bind.train.stage import StageRunner
from bind.train.trainer import build_model, seed_everything

STEPS = 100
ANCHOR_PRETRAIN = {"name": "anchor", "kind": "pretrain", "modality": "toy_a", "loss": "supcon", "batch_size": 64}


def toy_recipe(stages: list[dict]) -> object:
    view = lambda v, split: {"source": "toy_clusters", "split": split, "args": {"view": v}}  # noqa: E731
    data = {
        "anchor_modality": "toy_a",
        "embed_dim": 16,
        "device": "cpu",
        "checkpoint_every": None,
        "modalities": {
            m: {"encoder": m, "train_data": view(v, "train"), "eval_data": view(v, "eval")}
            for m, v in (("toy_a", "a"), ("toy_b", "b"))
        },
        "stages": [{"steps": STEPS, "optimizer": {"lr": 1e-2, "weight_decay": 0.0}, **s} for s in stages],
    }
    return parse_recipe(data, "<toy recipe>")


def train(recipe):
    """The recipe's stages, each run by a StageRunner as run_recipe runs them (no checkpoints, no metrics)."""
    seed_everything(recipe.seed)
    model = build_model(recipe)
    train_sets = {m: build_dataset(s.train_data, recipe.data_root) for m, s in recipe.modalities.items()}
    for stage in recipe.stages:
        StageRunner(model, recipe, stage, torch.device("cpu"), train_sets).run(None, show_progress=False)
    return model.eval()


def embedded(model, recipe, modality: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's embeddings of a modality's train or eval items, and their labels."""
    items = build_dataset(getattr(recipe.modalities[modality], f"{split}_data"), recipe.data_root)
    with torch.no_grad():
        return model[modality].embed([items[i] for i in range(len(items))]), items.labels


def prototype_accuracy(model, recipe) -> float:
    """View b's eval items classified by the nearest prototype (class mean) of its train items."""
    (z_train, y_train), (z_eval, y_eval) = (embedded(model, recipe, "toy_b", split) for split in ("train", "eval"))
    return zero_shot_accuracy(z_eval, y_eval, *class_prototypes(z_train, y_train))


def negated(name: str) -> str:
    """Register ``-loss`` beside ``loss`` (as a plugin would) and return its name."""
    info = get_loss(name)
    flipped = f"negated_{name}"
    register_loss(flipped, kind=info.kind)(lambda *args, **kw: -info.fn(*args, **kw))
    return flipped


def pretrain_accuracy(loss: str) -> float:
    """View b trained alone with ``loss``."""
    recipe = toy_recipe([{"name": "b", "kind": "pretrain", "modality": "toy_b", "loss": loss, "batch_size": 64}])
    return prototype_accuracy(train(recipe), recipe)


def bind_recall(loss: str) -> float:
    """View b bound to the frozen, pretrained view a with ``loss``: class-match R@1 of b's eval items among a's."""
    recipe = toy_recipe(
        [ANCHOR_PRETRAIN, {"name": "bind", "kind": "bind", "pairs": {"toy_b": {"loss": loss, "batch_size": 64}}}]
    )
    model = train(recipe)
    (zb, yb), (za, ya) = embedded(model, recipe, "toy_b", "eval"), embedded(model, recipe, "toy_a", "eval")
    return class_match_retrieval(zb, yb, za, ya)["R@1"]


@pytest.fixture(scope="module")
def untrained() -> float:
    """The same measure on an untrained tower: what the nuisance dimensions leave of the classes."""
    recipe = toy_recipe([ANCHOR_PRETRAIN])
    seed_everything(recipe.seed)
    return prototype_accuracy(build_model(recipe).eval(), recipe)


def builtin(kind: str) -> list[str]:
    return [name for name in list_losses(kind) if not name.startswith("negated_")]


@pytest.mark.parametrize("loss", builtin("pretrain"))
def test_each_pretrain_loss_separates_the_classes_and_its_negation_does_not(loss, untrained):
    learned, flipped = pretrain_accuracy(loss), pretrain_accuracy(negated(loss))
    assert learned >= 0.85 and learned - untrained >= 0.25, (loss, learned, untrained)
    assert flipped <= 0.55, (loss, flipped)


@pytest.mark.parametrize("loss", builtin("bind"))
def test_each_bind_loss_aligns_the_paired_view_and_its_negation_does_not(loss):
    learned, flipped = bind_recall(loss), bind_recall(negated(loss))
    assert learned >= 0.85, (loss, learned)
    assert flipped <= 0.25, (loss, flipped)  # 4 classes: chance is 0.25
