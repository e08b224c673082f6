"""Image and text encoders: raw input handling, checkpoints, pooling, pretrained MiniLM, asset export.

The contract every registered encoder signs up for (forward, backward, freeze, save/load) is tested
in test_registry.py; this file tests what is specific to images and text.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from bind import ConfigError, DataError, InputError, create_encoder, get_encoder_info
from encoders.image import MNIST_MEAN, MNIST_STD
from encoders.image_io import load_image

RNG = np.random.default_rng(0)


def tiny(name: str, tmp_path, **overrides):
    torch.manual_seed(0)
    return create_encoder(name, **{**get_encoder_info(name).tiny_kwargs(tmp_path), **overrides}).eval()


# ---- images: raw inputs ---------------------------------------------------------------------------
def test_png_round_trip_rgb_grayscale_and_conversions(tmp_path):
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    expected_rgb = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(load_image(tmp_path / "rgb.png", 3), expected_rgb, atol=0, rtol=0)
    torch.testing.assert_close(load_image(str(tmp_path / "rgb.png"), 3), expected_rgb, atol=0, rtol=0)
    # grayscale -> RGB repeats the channel; RGB -> grayscale matches PIL's own luminance (up to its rounding)
    as_rgb = load_image(tmp_path / "gray.png", 3)
    assert as_rgb.shape == (3, 5, 7)
    for c in range(3):
        torch.testing.assert_close(as_rgb[c], torch.from_numpy(gray).float() / 255, atol=0, rtol=0)
    pil_luma = torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))).float() / 255
    torch.testing.assert_close(load_image(tmp_path / "rgb.png", 1)[0], pil_luma, atol=1 / 255 + 1e-6, rtol=0)
    # palette PNGs hold colour indices, 16-bit PNGs values up to 65535: both must come back as colours in [0, 1]
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    palette_rgb = np.array(Image.open(tmp_path / "palette.png").convert("RGB"))
    torch.testing.assert_close(load_image(tmp_path / "palette.png", 3), load_image(palette_rgb, 3))
    deep = (RNG.integers(0, 65536, (5, 7))).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    torch.testing.assert_close(load_image(tmp_path / "deep.png", 1)[0], torch.from_numpy(deep / 65535).float())


def test_arrays_tensors_and_pil_images_give_the_same_pixels():
    rgba = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    expected = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255  # alpha dropped
    for item in (
        rgba,
        rgba[..., :3].astype(np.float32) / 255,
        torch.from_numpy(rgba).permute(2, 0, 1),
        Image.fromarray(rgba[..., :3]),
    ):
        torch.testing.assert_close(load_image(item, 3), expected, atol=1e-6, rtol=0)
    plane = RNG.random((6, 4), dtype=np.float32)
    torch.testing.assert_close(load_image(plane, 1), torch.from_numpy(plane)[None])
    torch.testing.assert_close(load_image(torch.from_numpy(plane), 1), torch.from_numpy(plane)[None])
    sixteen_bit = np.full((3, 3), 65535, dtype=np.uint16)
    torch.testing.assert_close(load_image(sixteen_bit, 1), torch.ones(1, 3, 3))


def _bad_image(kind: str, directory):
    if kind in ("corrupt", "empty-file"):
        path = directory / ("broken.png" if kind == "corrupt" else "empty.jpg")
        path.write_bytes(b"not a png at all" if kind == "corrupt" else b"")
        return path
    return {
        "missing": directory / "missing.png",
        "nan": np.full((4, 4), np.nan, dtype=np.float32),
        "4d-array": np.zeros((2, 3, 4, 5), dtype=np.uint8),
        "4d-tensor": torch.zeros(1, 3, 8, 8),
        "0-255-floats": np.full((4, 4), 200.0),
        "int64": np.zeros((4, 4), dtype=np.int64),
        "0-pixels": np.zeros((0, 4), dtype=np.uint8),
        "list": [[0, 1], [1, 0]],
    }[kind]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", "broken.png.*corrupt"),
        ("empty-file", "empty.jpg.*empty"),
        ("missing", "missing.png.*does not exist"),
        ("nan", "NaN or inf"),
        ("4d-array", r"expected \(H, W\) or \(H, W, C\)"),
        ("4d-tensor", r"expected \(C, H, W\)"),
        ("0-255-floats", "divide 0-255 data by 255"),
        ("int64", "dtype .*int64.*expected uint8"),
        ("0-pixels", "is empty"),
        ("list", "expected a file path"),
    ],
)
def test_bad_images_raise_input_error_saying_what_was_expected(tmp_path, kind, message):
    with pytest.raises(InputError, match=message):
        load_image(_bad_image(kind, tmp_path), 3)


def test_digits_preprocess_normalises_like_mnist_and_paths_match_arrays(tmp_path):
    enc = tiny("digits_cnn", tmp_path)
    digit = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    expected = (torch.from_numpy(digit).float()[None] / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(enc.preprocess(digit), expected)
    Image.fromarray(digit).save(tmp_path / "digit.png")
    z = enc.embed([tmp_path / "digit.png", digit, torch.from_numpy(digit)])
    torch.testing.assert_close(z[0], z[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(z[0], z[2], atol=1e-6, rtol=0)
    assert enc.preprocess(RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)).shape == (1, 28, 28)


def test_torchvision_preprocess_resizes_crops_and_normalises(tmp_path):
    enc = tiny("tv_resnet18", tmp_path)
    x = enc.preprocess(np.full((40, 60, 3), 0.5, dtype=np.float32))
    assert x.shape == (3, 32, 32)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    assert [type(b).__name__ for b in enc.trunk_blocks()] == ["Sequential"] * 4  # layer1..layer4


# ---- images: local checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_a_torchvision_checkpoint_with_its_head(tmp_path, suffix):
    arch = {k: v for k, v in get_encoder_info("tv_vit_b_16").tiny_kwargs(tmp_path).items() if k != "embed_dim"}
    reference = torchvision.models.VisionTransformer(**arch, num_classes=10)  # the head is skipped on load
    state = reference.state_dict()
    path = tmp_path / f"vit{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    enc = tiny("tv_vit_b_16", tmp_path, weights_path=str(path))
    loaded = enc.trunk.state_dict()
    assert not any(k.startswith("heads") for k in loaded)
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


def test_bad_weights_path_raises_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.pth.*does not exist"):
        tiny("tv_resnet18", tmp_path, weights_path=str(tmp_path / "nowhere.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="garbage.pth.*could not be read"):
        tiny("tv_resnet18", tmp_path, weights_path=str(tmp_path / "garbage.pth"))
    torch.save(torchvision.models.VisionTransformer(32, 16, 1, 2, 64, 64).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(DataError, match="wide.pth.*does not fit"):
        tiny("tv_vit_b_16", tmp_path, weights_path=str(tmp_path / "wide.pth"))  # hidden 64, encoder expects 32
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        tiny("tv_vit_b_16", tmp_path, image_size=40)


# ---- text --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item", ["", "  \n\t", None, 7, b"bytes"])
def test_text_rejects_empty_and_non_string_items(tmp_path, item):
    enc = tiny("hf_text", tmp_path)
    with pytest.raises(InputError, match="empty|expects a string"):
        enc.preprocess(item)


def test_long_text_is_truncated_to_max_length(tmp_path):
    enc = tiny("hf_text", tmp_path, max_length=8)
    tokens = enc.preprocess("the digit seven " * 20)["input_ids"]
    assert tokens.numel() == 8 and tokens[-1] == enc.tokenizer.sep_token_id
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        tiny("hf_text", tmp_path, max_length=1000)


def test_mean_pooling_averages_only_real_tokens(tmp_path):
    enc = tiny("hf_text", tmp_path)
    batch = enc.collate([enc.preprocess(t) for t in ["a cat", "a handwritten digit seven next to a dog"]])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first row is padded
    with torch.no_grad():
        alone = enc.trunk(**enc.collate([enc.preprocess("a cat")])).last_hidden_state
        torch.testing.assert_close(enc.forward_features(batch)[0], alone[0].mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "pooling"), [("hf_text", "mean"), ("hf_text", "cls"), ("hf_clip_text", None)])
def test_padding_does_not_change_a_text_embedding(tmp_path, name, pooling):
    enc = tiny(name, tmp_path, **({"pooling": pooling} if pooling else {}))
    alone = enc.embed(["a cat"])
    padded = enc.embed(["a cat", "a much longer text about a handwritten digit seven"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return create_encoder("minilm", head="identity").eval()  # embed_dim=None keeps the 384-d features


def test_minilm_similarities_are_semantic(minilm):
    z = minilm.embed(["a handwritten seven", "the digit seven", "a photo of a cat"])
    assert z.shape == (3, 384)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2


def test_minilm_builds_as_itself_and_exports_nothing(minilm, tmp_path):
    assert minilm.build_args == {"name": "minilm", "kwargs": {"head": "identity"}}
    assert minilm.export_assets(tmp_path / "assets") == {}  # a reload reads the installed package
    assert not (tmp_path / "assets").exists()


# ---- Hugging Face towers: export assets, rebuild without weights ------------------------------------
@pytest.mark.parametrize(("name", "raw"), [("hf_text", "a cat"), ("hf_clip_text", "a cat"), ("hf_clip_vision", None)])
def test_exported_assets_rebuild_the_tower_without_weights(tmp_path, name, raw):
    enc = tiny(name, tmp_path / "scratch")
    items = [raw] if raw else [RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)]
    overrides = enc.export_assets(tmp_path / "run" / "assets" / "x")
    assert overrides["load_weights"] is False and overrides["path"].endswith("x")
    assert (tmp_path / "run" / "assets" / "x" / "config.json").is_file()
    kwargs = {**get_encoder_info(name).tiny_kwargs(tmp_path / "scratch"), **overrides}
    rebuilt = create_encoder(name, **{**kwargs, "path": str(tmp_path / "run" / "assets" / "x")}).eval()
    assert not torch.allclose(rebuilt.embed(items), enc.embed(items))  # fresh weights, not the original files
    rebuilt.load_state_dict(enc.state_dict())
    torch.testing.assert_close(rebuilt.embed(items), enc.embed(items), atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["embed", "encode"])
def test_texts_are_batched_longest_first_and_come_back_in_input_order(minilm, how):
    """sentence-transformers sorts texts by length before batching, so a batch pads to about its own length:
    here too. The rows come back in input order, each what the text gives alone (padding is masked out)."""
    from bind.model import BindModel

    texts = ["a seven", "the digit seven written by hand " * 4, "one", "a handwritten nine " * 3, "two cats", "x y"]
    seen = []
    preprocess_many = minilm.preprocess_many
    minilm.preprocess_many = lambda batch, *args: seen.extend(batch) or preprocess_many(batch, *args)
    try:
        if how == "embed":
            z = minilm.embed(texts, batch_size=2)
        else:
            z = torch.from_numpy(BindModel({"text": minilm}, "text").encode("text", texts, batch_size=2))
    finally:
        del minilm.preprocess_many
    assert seen == sorted(texts, key=len, reverse=True)  # by characters, as sentence-transformers; ties kept
    alone = torch.cat([minilm.embed([t]) for t in texts])
    torch.testing.assert_close(z, alone, atol=2e-6, rtol=0)


def test_batched_tokenising_gives_the_tokens_of_one_text_at_a_time(minilm):
    texts = ["a seven", "the digit seven written by hand " * 30, "x", "Ünïcode wörds, and punctuation!?"]
    many = minilm.preprocess_many(texts)
    for text, got in zip(texts, many, strict=True):
        want = minilm.tokenizer(text, truncation=True, max_length=minilm.max_length)  # the tokenizer, one text
        assert (
            got["input_ids"].tolist() == want["input_ids"] and got["attention_mask"].tolist() == want["attention_mask"]
        )
    assert len(many[1]["input_ids"]) == minilm.max_length  # truncated
    with pytest.raises(InputError, match="empty or only whitespace"):
        minilm.preprocess_many(["fine", "  "])
