"""ImageBind's towers from checkpoints in its format: key mapping, sizes read off tensors, preprocessing values,
pooling and clip averaging, and the errors a wrong file gets. No real weights here: tiny models in the same format.

Parity with ImageBind's own code (its repository run side by side, not part of bindkit) is in the README."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from PIL import Image

from bind import ConfigError, InputError, create_encoder
from bind.model import BindModel
from encoders import imagebind as ib

# ImageBind's own keys outside the transformer blocks, per tower ({m}: the tower's name), as its ImageBindModel has them
IMAGEBIND_KEYS = {
    "vision": ["modality_heads.{m}.0.bias", "modality_heads.{m}.0.weight", "modality_heads.{m}.2.weight",
               "modality_preprocessors.{m}.cls_token", "modality_preprocessors.{m}.pos_embedding_helper.pos_embed",
               "modality_preprocessors.{m}.rgbt_stem.proj.1.weight", "modality_trunks.{m}.pre_transformer_layer.0.bias",
               "modality_trunks.{m}.pre_transformer_layer.0.weight"],
    "text": ["modality_heads.{m}.proj.0.bias", "modality_heads.{m}.proj.0.weight", "modality_heads.{m}.proj.1.weight",
             "modality_postprocessors.{m}.1.log_logit_scale", "modality_preprocessors.{m}.mask",
             "modality_preprocessors.{m}.pos_embed", "modality_preprocessors.{m}.token_embedding.weight"],
    "audio": ["modality_heads.{m}.0.bias", "modality_heads.{m}.0.weight", "modality_heads.{m}.2.weight",
              "modality_postprocessors.{m}.1.log_logit_scale", "modality_preprocessors.{m}.cls_token",
              "modality_preprocessors.{m}.pos_embedding_helper.pos_embed",
              "modality_preprocessors.{m}.rgbt_stem.norm_layer.bias",
              "modality_preprocessors.{m}.rgbt_stem.norm_layer.weight", "modality_preprocessors.{m}.rgbt_stem.proj.weight"],
    "depth": ["modality_heads.{m}.0.bias", "modality_heads.{m}.0.weight", "modality_heads.{m}.2.weight",
              "modality_postprocessors.{m}.1.log_logit_scale", "modality_preprocessors.{m}.cls_token",
              "modality_preprocessors.{m}.depth_stem.norm_layer.bias",
              "modality_preprocessors.{m}.depth_stem.norm_layer.weight", "modality_preprocessors.{m}.depth_stem.proj.weight",
              "modality_preprocessors.{m}.pos_embedding_helper.pos_embed"],
    "imu": ["modality_heads.{m}.0.bias", "modality_heads.{m}.0.weight", "modality_heads.{m}.3.weight",
            "modality_postprocessors.{m}.1.log_logit_scale", "modality_preprocessors.{m}.cls_token",
            "modality_preprocessors.{m}.imu_stem.norm_layer.bias", "modality_preprocessors.{m}.imu_stem.norm_layer.weight",
            "modality_preprocessors.{m}.imu_stem.proj.weight", "modality_preprocessors.{m}.pos_embed"],
}  # fmt: skip
IMAGEBIND_KEYS["thermal"] = [k.replace("depth_stem", "rgbt_stem") for k in IMAGEBIND_KEYS["depth"]]
BLOCK_KEYS = ["attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight", "mlp.fc1.bias",
              "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "norm_1.bias", "norm_1.weight", "norm_2.bias",
              "norm_2.weight"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ib.save_tiny_checkpoint(tmp_path_factory.mktemp("imagebind") / "tiny.pth")


@pytest.fixture(scope="module")
def state(checkpoint):
    return torch.load(checkpoint, weights_only=True)


def tower(name, checkpoint, **kwargs):
    torch.manual_seed(0)
    return create_encoder(name, checkpoint=str(checkpoint), num_heads=2, **kwargs).eval()


@pytest.mark.parametrize("modality", list(ib.RELEASED))
def test_checkpoint_keys_are_imagebinds(state, modality):
    mine = sorted(k for k in state if k.split(".")[1] == modality and ".blocks." not in k)
    assert mine == sorted(k.format(m=modality) for k in IMAGEBIND_KEYS[modality])
    blocks = sorted(k.split("blocks.0.")[1] for k in state if k.startswith(f"modality_trunks.{modality}.blocks.0."))
    assert blocks == sorted(BLOCK_KEYS + (["attn.bias_k", "attn.bias_v"] if modality not in ("vision", "text") else []))


@pytest.mark.parametrize("modality", list(ib.RELEASED))
def test_key_mapping_round_trips(state, modality):
    ours = ib.from_imagebind(state, modality)
    assert all(k.startswith(("trunk.", "head.", "log_logit_scale")) for k in ours)
    back = ib.to_imagebind(ours, modality)
    assert sorted(back) == sorted(k for k in state if k.split(".")[1] == modality)
    for key, value in back.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_sizes_are_read_off_the_tensors():
    # a model of other sizes in the same format: 64 wide, 3 blocks, vision patches of 8 on 32 px, IMU of 2 x 8 samples
    sizes = {
        "vision": {"kernel": [2, 8, 8], "stride": [2, 8, 8], "input_size": [32, 32]},
        "audio": {"kernel": [16, 16], "stride": [10, 10], "input_size": [128, 204]},
        "imu": {"kernel": [8], "stride": [8], "input_size": [160]},
        "text": {"vocab_size": 500, "context_length": 20},
    }
    for modality, extra in sizes.items():
        cfg = {**ib.tiny_config(modality), "width": 64, "depth": 3, "heads": 1, "out_dim": 24, **extra}
        trunk = ib.ImageBindTrunk(cfg)
        tower = torch.nn.Module()
        tower.trunk, tower.head = trunk, ib.imagebind_head(cfg)
        tower.log_logit_scale = torch.nn.Parameter(torch.tensor(1.0))
        inferred = ib.infer_config(ib.to_imagebind(tower.state_dict(), modality), modality)
        assert inferred == cfg, modality  # 64 wide: one 64-d head, as the rule for unknown widths says


def test_heads_come_from_the_released_widths_or_must_be_given():
    assert ib._guess_heads(1280, "vision") == 16 and ib._guess_heads(384, "depth") == 8
    with pytest.raises(ConfigError, match="attention heads is stored in no tensor.*pass num_heads=N"):
        ib._guess_heads(48, "audio")


def test_audio_stride_is_solved_from_the_patch_count():
    assert ib._audio_stride(16, 12 * 19, 128, 204, "x") == 10  # the release: 228 patches
    with pytest.raises(ConfigError, match="no stride of the 16-bin audio stem gives 7 patches"):
        ib._audio_stride(16, 7, 128, 204, "x")


# ---- preprocessing values ------------------------------------------------------------------------------------------
def test_clip_times_are_pytorchvideos_constant_clips_per_video():
    assert ib.clip_times(5.0, 2, 3) == [(0, 2), (1.5, 3.5), (3, 5)]  # evenly spaced, the last ends at the end
    assert ib.clip_times(1.2, 2, 3) == [(0, 2)] * 3  # shorter than a clip: the same clip three times
    assert ib.clip_times(12.0, 2, 5)[-1] == (10, 12)


def test_audio_clips_are_normalised_kaldi_fbanks():
    rng = np.random.default_rng(0)
    wave = torch.from_numpy(rng.standard_normal((1, 16000 * 5)).astype(np.float32) * 0.1 + 0.05)
    clips = ib.audio_clips(wave)
    assert clips.shape == (3, 1, 128, 204)
    # ImageBind makes each clip zero-mean in place on the shared waveform: the second clip (1.5 s to 3.5 s) starts
    # with the half second the first clip (0 to 2 s) already shifted
    shared = wave.clone()
    shared[:, :32000] -= shared[:, :32000].mean()
    middle = shared[:, 24000:56000]
    fbank = kaldi.fbank(
        middle - middle.mean(), htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T  # fmt: skip
    assert fbank.shape[1] == 198  # 2 s of 10 ms frames (25 ms windows): padded to 204 with zeros
    torch.testing.assert_close(clips[1, 0, :, :198], (fbank + 4.268) / 9.138, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(clips[1, 0, :, 198:], torch.full((128, 6), 4.268 / 9.138))


def test_short_audio_is_one_clip_three_times_and_too_short_audio_is_refused():
    clips = ib.audio_clips(torch.randn(1, 12000) * 0.1)
    torch.testing.assert_close(clips[0], clips[2], atol=1e-4, rtol=0)  # the same samples, made zero-mean twice
    with pytest.raises(InputError, match="shorter than one 25 ms frame"):
        ib.audio_clips(torch.randn(1, 300))


def test_image_pixels_resize_crop_and_clip_normalisation(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (255, 128, 0)).save(path)
    pixels = ib.image_pixels(str(path), 224)
    assert pixels.shape == (3, 224, 224)
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(ib.CLIP_MEAN)) / torch.tensor(ib.CLIP_STD)
    torch.testing.assert_close(pixels.mean((1, 2)), expected, atol=1e-5, rtol=0)
    assert torch.equal(ib.image_pixels(np.asarray(Image.open(path)), 224), pixels)  # arrays as files


def test_video_clips_take_first_and_last_frames_and_three_crops():
    frames = np.zeros((60, 30, 40, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(60, dtype=np.uint8)[:, None, None] * 4  # red encodes the frame index
    clips = ib.video_clips(frames, fps=10.0, size=16, clips=5)
    assert clips.shape == (15, 3, 2, 16, 16)
    red = clips[:, 0, :, 0, 0] * ib.CLIP_STD[0] + ib.CLIP_MEAN[0]  # (15, 2): red of each clip's two frames
    index = (red * 255 / 4).round().long()
    # 6 s at 10 fps: clips start at 0, 1, 2, 3, 4 s and span 20 frames; each keeps its first and last, 3 crops each
    assert index[::3].tolist() == [[0, 19], [10, 29], [20, 39], [30, 49], [40, 59]]


# ---- towers ---------------------------------------------------------------------------------------------------------
def test_text_is_pooled_at_the_end_token(checkpoint):
    text = tower("imagebind_text", checkpoint)
    tokens = torch.stack([text.preprocess("a red bird")])
    end = int(tokens.argmax(-1))
    assert tokens[0, end] == text.tokenizer.end_id
    changed = tokens.clone()
    changed[0, end + 1 :] = 7  # what comes after the end token is masked out by causal attention
    with torch.no_grad():
        torch.testing.assert_close(text(tokens), text(changed))
        assert not torch.allclose(text(tokens), text(torch.stack([text.preprocess("a blue bird")])))


def test_audio_clip_embeddings_are_averaged(checkpoint, tmp_path):
    audio = tower("imagebind_audio", checkpoint)
    path = tmp_path / "tone.wav"
    t = np.arange(16000 * 4) / 16000
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)), 16000, subtype="PCM_16")
    with torch.no_grad():
        per_clip = F.normalize(audio.head(audio.trunk(ib.audio_clips(ib.load_waveform(str(path))))), dim=-1)
        torch.testing.assert_close(audio.embed([str(path)])[0], F.normalize(per_clip.mean(0), dim=0))


def test_stereo_audio_uses_its_first_channel_as_imagebind_does(checkpoint):
    audio = tower("imagebind_audio", checkpoint)
    left = np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1
    stereo = np.stack([left, left[::-1].copy()])
    torch.testing.assert_close(audio.preprocess((stereo, 16000)), audio.preprocess(left[None]), atol=1e-4, rtol=0)


def test_logit_scales_and_projection_come_from_the_checkpoint(checkpoint, state):
    assert math.isclose(tower("imagebind_audio", checkpoint).logit_scale.item(), 20.0, rel_tol=1e-5)
    assert not tower("imagebind_audio", checkpoint).log_logit_scale.requires_grad
    assert tower("imagebind_text", checkpoint).log_logit_scale.requires_grad
    depth = tower("imagebind_depth", checkpoint)
    torch.testing.assert_close(depth.head.weight, state["modality_heads.depth.2.weight"])
    assert math.isclose(depth.logit_scale.item(), 5.0, rel_tol=1e-5)


def test_a_new_head_projects_elsewhere_and_keeps_the_trunk(checkpoint):
    released = tower("imagebind_thermal", checkpoint)
    mine = tower("imagebind_thermal", checkpoint, head="linear", embed_dim=8)
    assert mine.embed_dim == 8
    torch.testing.assert_close(mine.trunk.state_dict(), released.trunk.state_dict())
    with pytest.raises(ConfigError, match="embed_dim must be 16"):
        tower("imagebind_thermal", checkpoint, embed_dim=8)


def test_saved_model_rebuilds_without_the_checkpoint(checkpoint, tmp_path):
    image, text = tower("imagebind_image", checkpoint), tower("imagebind_text", checkpoint)
    model = BindModel({"image": image, "text": text}, "image").eval()
    model.save_pretrained(tmp_path / "model")
    checkpoint.rename(checkpoint.with_suffix(".moved"))
    try:
        loaded = BindModel.from_pretrained(tmp_path / "model").eval()
    finally:
        checkpoint.with_suffix(".moved").rename(checkpoint)
    items = ["a cat", "two dogs"]
    torch.testing.assert_close(loaded.embed("text", items), model.embed("text", items))
    assert loaded["text"].build_args["kwargs"]["checkpoint"] is None


# ---- no silent random tower ----------------------------------------------------------------------------------------
def test_without_checkpoint_a_tower_is_refused_and_the_error_says_what_to_pass():
    with pytest.raises(ConfigError) as err:
        create_encoder("imagebind_audio")
    assert str(err.value) == (
        "checkpoint: not given, so ImageBind's audio tower would start from random weights: pass checkpoint=PATH "
        "(imagebind_huge.pth, from https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth) or random_init=True "
        "to train imagebind_huge's architecture from random weights on purpose"
    )


def test_random_init_builds_imagebind_huges_architecture_on_purpose():
    imu = create_encoder("imagebind_imu", random_init=True)
    width, depth, heads = ib.RELEASED["imu"]
    assert (imu.cfg["width"], imu.cfg["depth"], imu.cfg["heads"], imu.embed_dim) == (width, depth, heads, 1024)
    assert imu.build_args["kwargs"] == {"random_init": True}


def test_random_init_and_a_checkpoint_together_are_refused(checkpoint):
    with pytest.raises(ConfigError, match=r"^checkpoint: pass either checkpoint= .* or random_init=True, not both$"):
        create_encoder("imagebind_imu", checkpoint=str(checkpoint), random_init=True)


def test_a_saved_random_init_model_reloads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    imu = create_encoder("imagebind_imu", config=ib.tiny_config("imu"), random_init=True).eval()
    model = BindModel({"imu": imu}, "imu").eval()
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)  # a rebuild that ignored the saved weights would differ
    loaded = BindModel.from_pretrained(tmp_path / "model").eval()
    items = imu.example_inputs(3)
    torch.testing.assert_close(loaded.embed("imu", items), model.embed("imu", items), atol=0, rtol=0)
    assert loaded["imu"].build_args["kwargs"]["random_init"] is True


# ---- what a wrong file gets --------------------------------------------------------------------------------------
def test_missing_checkpoint_says_where_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; download https://dl\.fbaipublicfiles\.com/imagebind/"):
        create_encoder("imagebind_audio", checkpoint=str(tmp_path / "imagebind_huge.pth"))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    fake = tmp_path / "imagebind_huge.pth"
    fake.write_text("not weights")
    with pytest.raises(ConfigError, match="not a plain PyTorch state dict"):
        create_encoder("imagebind_image", checkpoint=str(fake))


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"modality_trunks.audio.blocks.0.norm_1.weight": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(ConfigError, match="weights_only=True"):
        create_encoder("imagebind_audio", checkpoint=str(evil))
    assert "code ran" not in capsys.readouterr().out


def test_a_checkpoint_without_the_tower_lists_what_it_has(tmp_path, state):
    only_text = tmp_path / "text_only.pth"
    torch.save({k: v for k, v in state.items() if ".text." in k}, only_text)
    with pytest.raises(ConfigError, match="no ImageBind imu tower.*it has towers: text"):
        create_encoder("imagebind_imu", checkpoint=str(only_text), num_heads=2)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, state):
    broken = dict(state)
    broken["modality_heads.audio.0.weight"] = torch.ones(5)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ConfigError, match=r"'trunk\.norm\.weight' has shape \(5,\); the audio tower expects \(32,\)"):
        create_encoder("imagebind_audio", checkpoint=str(path), num_heads=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 10**9}, r"width must be a whole number \(or list of them\) in 1..16384"),
        ({"heads": 3}, "heads=3 does not divide width=32"),
        ({"kernel": [0, 4]}, "kernel must be"),
        ({"modality": "smell"}, "modality one of vision, text"),
        ({"pre_norm": "yes"}, "pre_norm must be true or false"),
    ],
)
def test_absurd_sizes_in_a_config_are_refused_before_building(change, message):
    with pytest.raises(ConfigError, match=message):
        create_encoder("imagebind_thermal", config={**ib.tiny_config("thermal"), **change})
