"""BindModel: construction errors, saving, loading, and what a saved directory holds."""

from __future__ import annotations

import json

import imu_plugin  # noqa: F401
import pytest
import torch
from conftest import raw_examples

from bind import ConfigError, DataError, UnknownEncoderError, create_encoder
from bind.model import BindModel


def small_model() -> BindModel:
    torch.manual_seed(0)
    return BindModel(
        {
            "image": create_encoder("digits_cnn", width=4, embed_dim=16),
            "imu": create_encoder("imu_test_cnn", width=8, embed_dim=16),
        },
        anchor_modality="image",
    )


def test_embed_takes_raw_inputs_per_modality():
    model = small_model().eval()
    z = model.embed("imu", raw_examples("imu", 4))
    assert z.shape == (4, 16)
    assert model.embed("image", raw_examples("image", 2)).shape == (2, 16)


def test_embed_dims_must_agree():
    with pytest.raises(ConfigError, match="share one embed_dim.*'image': 16.*'imu': 8"):
        BindModel(
            {
                "image": create_encoder("digits_cnn", width=4, embed_dim=16),
                "imu": create_encoder("imu_test_cnn", embed_dim=8),
            },
            anchor_modality="image",
        )


def test_anchor_must_be_present():
    with pytest.raises(ConfigError, match="anchor_modality 'audio' has no encoder"):
        BindModel({"image": create_encoder("digits_cnn", width=4)}, anchor_modality="audio")


def test_unknown_modality_lists_the_present_ones():
    with pytest.raises(ConfigError, match="no modality 'audio'; the model has: image, imu"):
        small_model().embed("audio", [])


def test_saved_directory_is_safetensors_plus_json_and_keeps_freeze_state(tmp_path):
    model = small_model()
    model["image"].freeze("all")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # + card
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["encoders"]["imu"] == {
        "name": "imu_test_cnn",
        "kwargs": {"width": 8, "embed_dim": 16},
        "freeze": "none",
        "unfreeze_last_blocks": 0,
    }
    loaded = BindModel.from_pretrained(tmp_path)
    assert loaded["image"].frozen and not loaded["imu"].frozen
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_incomplete_directory_names_the_missing_file(tmp_path):
    small_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DataError, match="model.safetensors is missing"):
        BindModel.from_pretrained(tmp_path)


def test_newer_format_is_refused(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="format_version 99 is not supported.*upgrade"):
        BindModel.from_pretrained(tmp_path)


def test_unregistered_encoder_on_load_names_it_and_the_plugin_flag(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoders"]["imu"]["name"] = "lidar_net"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownEncoderError, match="'lidar_net'.*--plugin MODULE"):
        BindModel.from_pretrained(tmp_path)


def test_a_shared_trunk_trains_with_its_owner_not_with_the_frozen_borrower():
    image = create_encoder("digits_cnn", width=4, embed_dim=16)
    video = create_encoder("video_frames", frame_encoder="digits_cnn", frame_encoder_kwargs={"width": 4}, embed_dim=16)
    model = BindModel({"image": image, "video": video}, anchor_modality="image")
    model.share_trunk("video", "image")
    video.freeze("trunk")  # the video's own frozen trunk must not freeze or eval the image's trunk
    image.freeze("none")
    model.train()
    assert video.trunk.frames is image.trunk
    assert all(m.training for m in image.trunk.modules())
    assert not video.trunk_frozen  # its frames move with the image tower, so its features must not be cached
    image.freeze("all")
    model.train()
    assert not any(m.training for m in image.trunk.modules()) and video.trunk_frozen
