"""LoRA (bind/lora.py): only adapters and head train, an adapted tower starts where it was, a saved run reloads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import raw_examples
from torch import nn

from bind import ConfigError, create_encoder
from bind.lora import apply_lora, lora_config
from bind.model import BindModel
from bind.recipe import parse_recipe
from bind.registry import get_encoder_info
from bind.train.trainer import build_model

RANK = 4


def tiny(name: str, tmp_path, **overrides) -> nn.Module:
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides})


def batch_of(encoder, n: int = 3, seed: int = 0):
    return encoder.collate([encoder.preprocess(x) for x in raw_examples(encoder.modality, n, seed)])


def lora_params(encoder) -> dict[str, nn.Parameter]:
    return {n: p for n, p in encoder.named_parameters() if ".lora_" in n}


def randomize_adapters(encoder) -> None:
    """lora_B starts at zero, which also zeroes lora_A's gradient: give B values, as training would."""
    with torch.no_grad():
        for name, p in lora_params(encoder).items():
            if ".lora_B." in name:
                p.normal_(0, 0.1)


def expected_adapter_size(encoder, rank: int) -> int:
    """rank * (in + out) per adapted Linear; a Conv's A is a conv to ``rank`` channels, its B a 1x1 conv."""
    total = 0
    for module in encoder.trunk.modules():
        base = getattr(module, "base_layer", None)
        if not hasattr(module, "lora_A"):
            continue
        if isinstance(base, nn.Linear):
            total += rank * (base.in_features + base.out_features)
        elif isinstance(base, nn.Conv2d):
            kernel = base.kernel_size[0] * base.kernel_size[1]
            total += rank * (base.in_channels * kernel // base.groups + base.out_channels)
    return total


TOWERS = [
    # name, adapted layers' full names (a sample), number of adapted layers
    ("hf_text", "encoder.layer.0.attention.self.query", 4),  # query + value of 2 layers
    ("tv_vit_b_16", "encoder.layers.encoder_layer_0.mlp.0", 2),  # the MLP linears of 1 layer
    ("tv_resnet18", "layer4.1.conv2", 20),  # every conv: stem, 16 in blocks, 3 downsample
]


@pytest.mark.parametrize("name, sample_layer, adapted", TOWERS, ids=[t[0] for t in TOWERS])
def test_only_adapters_and_head_get_gradients_and_output_starts_unchanged(name, sample_layer, adapted, tmp_path):
    torch.manual_seed(0)
    encoder = tiny(name, tmp_path).freeze("trunk")
    batch = batch_of(encoder)
    before = encoder.eval()(batch)
    head_size = sum(p.numel() for p in encoder.head.parameters()) + 1  # + the learnable logit scale

    apply_lora(encoder, rank=RANK, alpha=8)

    assert torch.allclose(encoder.eval()(batch), before, atol=1e-6)  # lora_B == 0: the tower is unchanged
    adapted_layers = [n for n, m in encoder.trunk.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert sample_layer in adapted_layers and len(adapted_layers) == adapted
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == expected_adapter_size(encoder, RANK) + head_size
    assert not encoder.trunk_frozen  # trainable adapters: the trunk's features must not be cached

    randomize_adapters(encoder)
    encoder.train()
    target = torch.randn(encoder.embed_dim)
    (encoder.logit_scale * encoder(batch) @ target).sum().backward()
    adapters = lora_params(encoder)
    for n, p in encoder.named_parameters():
        if n in adapters or n.startswith("head.") or n == "log_logit_scale":
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n  # every base weight of the trunk


def test_freeze_all_freezes_adapters_and_unfrozen_blocks_still_train(tmp_path):
    frozen = apply_lora(tiny("hf_text", tmp_path).freeze("all"), rank=RANK, alpha=8)
    assert frozen.frozen and frozen.trunk_frozen

    encoder = apply_lora(tiny("hf_text", tmp_path).freeze("trunk", unfreeze_last_blocks=1), rank=RANK, alpha=8)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert "trunk.encoder.layer.1.output.dense.weight" in trainable  # the last block, base weights included
    assert "trunk.encoder.layer.1.attention.self.query.base_layer.weight" in trainable
    assert "trunk.encoder.layer.0.attention.self.query.base_layer.weight" not in trainable
    assert "trunk.encoder.layer.0.attention.self.query.lora_A.default.weight" in trainable
    assert "trunk.embeddings.word_embeddings.weight" not in trainable

    unfrozen = apply_lora(tiny("hf_text", tmp_path), rank=RANK, alpha=8)  # freeze "none": LoRA freezes the trunk
    assert unfrozen.frozen_part == "trunk"
    assert not any(p.requires_grad for n, p in unfrozen.trunk.named_parameters() if ".lora_" not in n)


def test_lora_dropout_is_active_in_training_only(tmp_path):
    encoder = apply_lora(tiny("hf_text", tmp_path).freeze("trunk"), rank=RANK, alpha=8, dropout=0.5)
    query = encoder.trunk.encoder.layer[0].attention.self.query
    encoder.train()
    assert query.lora_dropout["default"].training and isinstance(query.lora_dropout["default"], nn.Dropout)
    assert not encoder.trunk.embeddings.training  # frozen and without adapters: stays in eval mode
    encoder.eval()
    assert not query.lora_dropout["default"].training


def test_bad_target_module_names_the_modality_and_the_layers(tmp_path):
    with pytest.raises(ConfigError, match=r"'qkv' matches no layer in the 'text' encoder.*attention\.self\.query"):
        apply_lora(tiny("hf_text", tmp_path).freeze("trunk"), rank=RANK, alpha=8, target_modules=["qkv"])
    # nn.MultiheadAttention never calls out_proj's forward: refused rather than silently ignored
    with pytest.raises(ConfigError, match=r"out_proj.*cannot adapt.*mlp\.0"):
        apply_lora(tiny("tv_vit_b_16", tmp_path).freeze("trunk"), rank=RANK, alpha=8, target_modules=["out_proj"])


def recipe_data(tmp_path, lora: dict, **stage) -> dict:
    text_args = {"path": get_encoder_info("hf_text").tiny_kwargs(tmp_path)["path"]}
    return {
        "anchor_modality": "image",
        "embed_dim": 16,
        "data_root": str(tmp_path),
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": {"source": "digit_captions"}},
            "text": {
                "encoder": "hf_text",
                "args": text_args,
                "freeze": "trunk",
                "lora": lora,
                "train_data": {"source": "digit_captions"},
            },
        },
        "stages": [{"name": "bind", "kind": "bind", "pairs": {"text": {}}, "steps": 1, **stage}],
    }


def test_recipe_with_lora_validates_builds_and_rejects_bad_values(tmp_path):
    recipe = parse_recipe(recipe_data(tmp_path, {"rank": 2, "alpha": 4, "target_modules": ["query", "key"]}))
    assert recipe.modalities["text"].lora.rank == 2 and recipe.modalities["text"].lora.dropout == 0.0
    assert parse_recipe(recipe_data(tmp_path, {})).modalities["text"].lora.rank == 8  # defaults
    model = build_model(recipe)
    assert lora_config(model["text"]) == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["key", "query"]}
    assert lora_config(model["image"]) is None

    with pytest.raises(ConfigError, match=r"modalities\.text\.lora\.rank: expected a positive integer, got 0"):
        parse_recipe(recipe_data(tmp_path, {"rank": 0}))
    with pytest.raises(ConfigError, match=r"modalities\.text\.lora\.rnak: unknown key \(did you mean 'rank'\?\)"):
        parse_recipe(recipe_data(tmp_path, {"rnak": 2}))
    # a stage that freezes the trunk still trains the adapters
    text = build_model(parse_recipe(recipe_data(tmp_path, {}, freeze={"text": "trunk"})))["text"].freeze("trunk")
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") or n == "log_logit_scale" for n in trainable)
    assert any(".lora_" in n for n in trainable)
    bad = parse_recipe(recipe_data(tmp_path, {"target_modules": ["qkv"]}))
    with pytest.raises(ConfigError, match=r"modalities\.text\.lora\.target_modules: 'qkv'.*'text'.*self\.query"):
        build_model(bad)


def test_saved_lora_run_reloads_with_its_trained_adapters(tmp_path):
    torch.manual_seed(0)
    text = apply_lora(tiny("hf_text", tmp_path).freeze("trunk"), rank=RANK, alpha=8, dropout=0.1)
    image = apply_lora(tiny("tv_vit_b_16", tmp_path).freeze("trunk"), rank=RANK, alpha=8)
    model = BindModel({"text": text, "image": image}, anchor_modality="image")
    batches = {m: batch_of(model[m], n=4) for m in model.modalities}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(3):  # a few steps, so that the adapters (lora_B starts at zero) really differ from init
        logits = model["image"].logit_scale * model("image", batches["image"]) @ model("text", batches["text"]).T
        loss = nn.functional.cross_entropy(logits, torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(lora_params(model[m])[n].abs().sum() > 0 for m in model.modalities for n in lora_params(model[m]))

    model.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["encoders"]["text"]["lora"] == {
        "rank": RANK,
        "alpha": 8,
        "dropout": 0.1,
        "target_modules": ["query", "value"],
    }
    for modality in ("text", "image"):
        adapter = tmp_path / "run" / "assets" / modality / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == RANK
        assert (adapter / "adapter_model.safetensors").is_file()

    reloaded = BindModel.from_pretrained(tmp_path / "run").eval()
    model.eval()
    for modality, batch in batches.items():
        assert torch.allclose(reloaded(modality, batch), model(modality, batch), atol=1e-6)
        assert reloaded[modality].trunk_frozen is False and reloaded[modality].frozen_part == "trunk"
    saved_b = lora_params(model["text"])["trunk.encoder.layer.0.attention.self.query.lora_B.default.weight"]
    assert torch.equal(
        lora_params(reloaded["text"])["trunk.encoder.layer.0.attention.self.query.lora_B.default.weight"], saved_b
    )


def test_adapter_folder_loads_with_peft_onto_the_untouched_tower(tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = apply_lora(tiny("hf_text", tmp_path).freeze("trunk"), rank=RANK, alpha=8)
    randomize_adapters(encoder)
    BindModel({"text": encoder}, anchor_modality="text").save_pretrained(tmp_path / "run")

    base = BertModel.from_pretrained(get_encoder_info("hf_text").tiny_kwargs(tmp_path)["path"]).eval()
    batch = batch_of(encoder)
    expected = encoder.eval().trunk(**batch).last_hidden_state
    assert not torch.allclose(base(**batch).last_hidden_state, expected, atol=1e-3)  # the adapters matter
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run" / "assets" / "text" / "adapter").eval()
    assert torch.allclose(peft_model(**batch).last_hidden_state, expected, atol=1e-6)


def test_a_lora_run_trains_the_adapters_and_its_run_directory_reloads(tmp_path, data_root):
    from bind.train.trainer import run_recipe

    data = recipe_data(tmp_path, {"rank": 2, "alpha": 4, "dropout": 0.1})
    data.update(data_root=str(data_root), num_workers=0, eval={"max_items": 20}, checkpoint_every=None)
    image, text = data["modalities"]["image"], data["modalities"]["text"]
    image["train_data"] = {"source": "mnist", "split": "train", "args": {"limit": 64}}
    image["eval_data"] = {"source": "mnist", "split": "eval"}
    text["eval_data"] = {"source": "digit_captions", "split": "eval"}
    data["stages"][0].update(steps=2, pairs={"text": {"batch_size": 16}}, optimizer={"lr": 0.05})
    run_recipe(parse_recipe(data), tmp_path / "run", show_progress=False)

    model = BindModel.from_pretrained(tmp_path / "run")
    adapters = lora_params(model["text"])
    assert adapters and all(p.abs().sum() > 0 for n, p in adapters.items() if ".lora_B." in n)  # trained from 0
    assert (tmp_path / "run" / "assets" / "text" / "adapter" / "adapter_model.safetensors").is_file()
    assert model.embed("text", ["a handwritten seven"]).shape == (1, 16)
