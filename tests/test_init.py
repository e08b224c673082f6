"""init_from_encoder: starting a depth/thermal/video trunk from an image trunk's weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bind import ConfigError, ModalityEncoder, create_encoder, get_encoder_info
from bind.train.warm_start import init_from_encoder


def tiny(name: str, tmp_path, **overrides) -> ModalityEncoder:
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides}).eval()


def perturbed(encoder: ModalityEncoder) -> ModalityEncoder:
    """Move every weight and BatchNorm statistic off its init, so a copy that did not happen would show."""
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand_like(tensor))  # rand >= 0: running_var stays positive
    return encoder


def test_digits_cnn_weights_give_depth_cnn_the_same_features(tmp_path, caplog):
    torch.manual_seed(0)
    image = perturbed(tiny("digits_cnn", tmp_path))
    depth = tiny("depth_cnn", tmp_path, image_size=28)
    head_before = {k: v.clone() for k, v in depth.head.state_dict().items()}
    scale_before = depth.logit_scale.clone()
    with caplog.at_level(logging.INFO, logger="bind.train.warm_start"):
        report = init_from_encoder(depth, image)
    trunk_names = [f"trunk.{n}" for n in depth.trunk.state_dict()]
    assert sorted(report["copied"]) == sorted(trunk_names)  # BatchNorm running statistics included
    assert report["adapted"] == [] and report["skipped"] == []
    assert "'digits_cnn' (image) -> 'depth_cnn' (depth)" in caplog.text
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(depth.forward_features(x), image.forward_features(x))
    for k, v in depth.head.state_dict().items():
        assert torch.equal(v, head_before[k]), f"head {k} changed"
    assert torch.equal(depth.logit_scale, scale_before)


def test_rgb_vit_stem_is_summed_so_a_grey_image_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    image = perturbed(tiny("tv_vit_b_16", tmp_path))  # 3-channel patch stem
    for target_name in ("depth_vit", "thermal_vit"):
        target = tiny(target_name, tmp_path)  # same tiny architecture, 1-channel stem
        head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
        report = init_from_encoder(target, image)
        assert report["adapted"] == ["trunk.conv_proj.weight"]
        assert "trunk.conv_proj.bias" in report["copied"] and "trunk.encoder.pos_embedding" in report["copied"]
        assert report["skipped"] == []
        grey = torch.randn(2, 1, 32, 32)
        torch.testing.assert_close(
            target.forward_features(grey), image.forward_features(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0
        )
        assert all(torch.equal(v, head_before[k]) for k, v in target.head.state_dict().items())


def test_one_channel_stem_is_repeated_and_divided_for_three_channels(tmp_path):
    torch.manual_seed(0)
    depth = perturbed(tiny("depth_vit", tmp_path))
    image = tiny("tv_vit_b_16", tmp_path)
    assert init_from_encoder(image, depth)["adapted"] == ["trunk.conv_proj.weight"]
    grey = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(
        image.forward_features(grey.expand(-1, 3, -1, -1)), depth.forward_features(grey), atol=1e-5, rtol=0
    )


def test_conv3d_is_inflated_from_conv2d_so_a_static_clip_gives_the_frame_features():
    torch.manual_seed(0)
    frames = 4
    image = ModalityEncoder("image", nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8, 4)
    video = ModalityEncoder(
        "video", nn.Sequential(nn.Conv3d(1, 8, (frames, 3, 3)), nn.AdaptiveAvgPool3d(1), nn.Flatten()), 8, 4
    )
    report = init_from_encoder(video, image)
    assert report == {"copied": ["trunk.0.bias"], "adapted": ["trunk.0.weight"], "skipped": []}
    grey = torch.randn(2, 1, 9, 9)
    static_clip = grey[:, :, None].expand(-1, -1, frames, -1, -1)  # (B, 1, T, H, W)
    torch.testing.assert_close(video.trunk(static_clip), image.trunk(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)


def test_shape_mismatches_are_skipped_and_reported(tmp_path):
    image = tiny("tv_vit_b_16", tmp_path)
    depth = tiny("depth_vit", tmp_path, image_size=48)  # more patches: a longer position table
    report = init_from_encoder(depth, image)
    assert report["skipped"] == ["trunk.encoder.pos_embedding"]
    assert "trunk.encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in report["copied"]


def test_unrelated_trunks_are_a_config_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match="'digits_cnn' \\(image\\) -> 'imu_transformer' \\(imu\\).*no trunk weight"):
        init_from_encoder(tiny("imu_transformer", tmp_path), tiny("digits_cnn", tmp_path))


def test_recipe_init_from_starts_the_trunk_from_the_trained_image_trunk(tmp_path):
    import yaml
    from PIL import Image
    from safetensors.torch import load_file

    from bind.recipe import parse_recipe
    from bind.train.trainer import run_recipe

    rng = np.random.default_rng(0)
    rows = ["image,thermal,label"]
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i}.png,{i % 4}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    def data(column):
        return {"source": "manifest", "args": {"path": str(tmp_path / "pairs.csv"), "column": column}}

    recipe = {
        "anchor_modality": "image",
        "embed_dim": 8,
        "device": "cpu",
        "modalities": {
            "image": {"encoder": "digits_cnn", "args": {"width": 4}, "train_data": data("image")},
            "thermal": {
                "encoder": "thermal_cnn",
                "args": {"width": 4, "image_size": 28},
                "freeze": "trunk",  # so the copied trunk is still there at the end
                "init_from": "image",
                "train_data": data("thermal"),
            },
        },
        "stages": [
            {"name": "image", "kind": "pretrain", "modality": "image", "steps": 2, "batch_size": 16},
            {"name": "bind", "kind": "bind", "pairs": {"thermal": {"pairing": "row", "batch_size": 16}}, "steps": 2},
        ],
    }
    run_recipe(parse_recipe(recipe), tmp_path / "run", show_progress=False)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    image = {k.removeprefix("encoders.image."): v for k, v in weights.items() if k.startswith("encoders.image.trunk")}
    thermal = {
        k.removeprefix("encoders.thermal."): v for k, v in weights.items() if k.startswith("encoders.thermal.trunk")
    }
    assert image.keys() == thermal.keys() and len(image) > 5
    for key in image:  # the pretrained image trunk, not the random init
        assert torch.equal(image[key], thermal[key]), key
    with pytest.raises(ConfigError, match=r"modalities\.thermal\.init_from: expected another modality"):
        parse_recipe(
            yaml.safe_load(
                yaml.safe_dump(
                    {
                        **recipe,
                        "modalities": {
                            **recipe["modalities"],
                            "thermal": {**recipe["modalities"]["thermal"], "init_from": "sonar"},
                        },
                    }
                )
            )
        )
