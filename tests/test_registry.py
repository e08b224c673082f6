"""The registry, and the contract every registered encoder signs up for by registering.

Each encoder's tiny variant must: embed raw inputs to (B, D) unit-norm rows, backpropagate, respect
``freeze`` (no grads, eval mode), and survive a save/load round trip with identical outputs.
"""

from __future__ import annotations

import imu_plugin  # noqa: F401  (a third-party encoder, registered like any user's)
import pytest
import torch
from conftest import raw_examples

from bind import ConfigError, UnknownEncoderError, create_encoder, get_encoder_info, list_encoders, register_encoder
from bind.encoder import ClipBatch, move_to
from bind.losses import info_nce
from bind.model import BindModel

ALL_ENCODERS = list_encoders()


def tiny(name: str, tmp_path) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(name, **get_encoder_info(name).tiny_kwargs(tmp_path))


def batch_of(encoder, n: int = 3):
    return encoder.collate([encoder.preprocess(x) for x in raw_examples(encoder.modality, n)])


def test_builtin_modalities_are_registered():
    for modality in ("image", "text", "audio", "video", "depth", "thermal", "imu"):
        assert list_encoders(modality=modality), f"no {modality} encoder registered"
    assert "imu_test_cnn" in list_encoders(modality="imu")


def test_list_by_glob_and_modality():
    assert "digits_cnn" in list_encoders("digits_*")
    assert all(get_encoder_info(n).modality == "audio" for n in list_encoders(modality="audio"))
    assert list_encoders("no_such_*") == []


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownEncoderError, match="did you mean 'digits_cnn'"):
        create_encoder("digit_cnn")


def test_wrong_kwargs_name_the_encoder_and_the_accepted_arguments():
    with pytest.raises(ConfigError, match="'digits_cnn' does not take argument.*colour.*embed_dim"):
        create_encoder("digits_cnn", colour=3)


def test_registering_records_modality_and_build_args(tmp_path):
    @register_encoder("thermal", tiny={"embed_dim": 8})
    def thermal_test_linear(embed_dim: int = 4) -> imu_plugin.ModalityEncoder:
        """A one-layer thermal encoder."""
        return imu_plugin.ModalityEncoder("thermal", torch.nn.Flatten(), 16, embed_dim)

    enc = create_encoder("thermal_test_linear", embed_dim=8)
    assert get_encoder_info("thermal_test_linear").modality == "thermal"
    assert get_encoder_info("thermal_test_linear").description == "A one-layer thermal encoder."
    assert enc.build_args == {"name": "thermal_test_linear", "kwargs": {"embed_dim": 8}}
    assert enc(torch.randn(2, 4, 4)).shape == (2, 8)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_embed_gives_unit_norm_rows(name, tmp_path):
    enc = tiny(name, tmp_path).eval()
    items = raw_examples(enc.modality, 3)
    z = enc.embed(items, batch_size=2)
    assert z.shape == (3, enc.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    # batching must not change an item's embedding (eval mode: no batch statistics)
    torch.testing.assert_close(enc.embed(items[:1]), z[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_forward_backward_reaches_every_trainable_parameter(name, tmp_path):
    enc = tiny(name, tmp_path).train()
    z = enc(batch_of(enc, 4))
    target = torch.nn.functional.normalize(torch.randn_like(z), dim=-1)
    info_nce(z, target, enc.logit_scale).backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    # pooler layers of some HF towers are unused by design: only those may lack a gradient
    assert [n for n in missing if "pooler" not in n] == []
    assert enc.head.weight.grad is not None if hasattr(enc.head, "weight") else True


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_freeze_all_means_no_grads_and_eval_mode(name, tmp_path):
    enc = tiny(name, tmp_path).freeze("all")
    enc.train()  # a training loop calls model.train(): frozen parts must stay in eval mode
    assert enc.frozen
    assert not any(m.training for m in enc.modules())
    z = enc(batch_of(enc))
    assert not z.requires_grad


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_freeze_trunk_trains_only_head_and_scale(name, tmp_path):
    enc = tiny(name, tmp_path).freeze("trunk")
    enc.train()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable, "freeze='trunk' must leave the head trainable"
    assert all(n.startswith("head.") or n == "log_logit_scale" for n in trainable)
    assert not any(m.training for m in enc.trunk.modules())
    blocks = enc.trunk_blocks()
    if blocks:
        enc.freeze("trunk", unfreeze_last_blocks=1).train()
        assert all(p.requires_grad for p in blocks[-1].parameters())
        assert blocks[-1].training
        if len(blocks) > 1:
            assert not any(p.requires_grad for p in blocks[0].parameters())


def test_unfreeze_more_blocks_than_exist_is_an_error(tmp_path):
    enc = tiny("digits_cnn", tmp_path)
    with pytest.raises(ConfigError, match="has .* trunk blocks"):
        enc.freeze("trunk", unfreeze_last_blocks=99)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    enc = tiny(name, tmp_path / "scratch")
    with torch.no_grad():  # move weights off their init so a load that silently re-inits would show
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model = BindModel({enc.modality: enc}, anchor_modality=enc.modality).eval()
    batch = batch_of(enc)
    before = model(enc.modality, batch)
    model.save_pretrained(tmp_path / "run")
    loaded = BindModel.from_pretrained(tmp_path / "run").eval()
    torch.testing.assert_close(loaded(enc.modality, move_to(batch, "cpu")), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded[enc.modality].logit_scale, enc.logit_scale)


def test_clip_batch_averages_clip_embeddings(tmp_path):
    enc = tiny("digits_cnn", tmp_path).eval()
    clips = torch.randn(5, 1, 28, 28)
    batch = ClipBatch(clips, torch.tensor([0, 0, 0, 1, 1]), 2)
    per_clip = enc(clips)
    expected = torch.nn.functional.normalize(torch.stack([per_clip[:3].mean(0), per_clip[3:].mean(0)]), dim=-1)
    torch.testing.assert_close(enc(batch), expected, atol=1e-6, rtol=1e-5)
