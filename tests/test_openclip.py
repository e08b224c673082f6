"""OpenCLIP towers: the same embeddings as open_clip's encode_image / encode_text, CLIP's tokenizer, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bind import ConfigError, create_encoder
from bind.model import BindModel
from encoders import openclip
from encoders.clip_bpe import CLIPTokenizer, find_bpe_vocab

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a dog", "A photo of a CAT!!", "naïve café &amp; résumé 123", "  spaces\tand\nnewlines ", "x " * 200,
         "emoji 🐶🚀", "it's we'll they're", "ÿ\x00\x01 control"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return openclip.save_tiny_open_clip(tmp_path_factory.mktemp("open_clip") / "tiny")


@pytest.fixture(scope="module")
def reference(folder):
    clip, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return clip.eval(), transform, open_clip.get_tokenizer(f"local-dir:{folder}")


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 9 * i, 61, 3)) * 255).astype(np.uint8)) for i in range(3)]


def test_image_tower_gives_encode_image(folder, reference):
    clip, transform, _ = reference
    tower = create_encoder("open_clip_image", path=str(folder)).eval()
    with torch.no_grad():
        expected = clip.encode_image(torch.stack([transform(im) for im in images()]), normalize=True)
    torch.testing.assert_close(tower.embed(images()), expected, atol=1e-5, rtol=0)


def test_text_tower_gives_encode_text(folder, reference):
    clip, _, tokenizer = reference
    tower = create_encoder("open_clip_text", path=str(folder)).eval()
    with torch.no_grad():
        expected = clip.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(tower.embed(TEXTS), expected, atol=1e-5, rtol=0)
    assert tower.logit_scale.item() == pytest.approx(float(clip.logit_scale.detach().exp()), rel=1e-5)
    assert not hasattr(tower.trunk.clip, "logit_scale") and tower.trunk.clip.visual is None  # only the text half


def test_image_files_are_read_as_stored(folder, reference, tmp_path):
    clip, transform, _ = reference
    tower = create_encoder("open_clip_image", path=str(folder)).eval()
    paths = []
    for i, im in enumerate(images()):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    with torch.no_grad():
        expected = clip.encode_image(torch.stack([transform(Image.open(p)) for p in paths]), normalize=True)
    torch.testing.assert_close(tower.embed([str(p) for p in paths]), expected, atol=1e-5, rtol=0)


def test_clip_tokenizer_matches_open_clips():
    ours, theirs = CLIPTokenizer(find_bpe_vocab()), open_clip.get_tokenizer("ViT-B-32")
    for text in TEXTS:
        assert torch.equal(ours(text), theirs([text])[0]), text
    assert ours("<|startoftext|>")[:3].tolist() == [49406, 49406, 49407]  # ImageBind's pattern knows its own specials


def test_a_saved_model_rebuilds_from_its_own_folder(folder, tmp_path):
    model = BindModel(
        {"image": create_encoder("open_clip_image", path=str(folder)), "text": create_encoder("open_clip_text", path=str(folder))},
        "image",
    ).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "run")
    loaded = BindModel.from_pretrained(tmp_path / "run").eval()
    torch.testing.assert_close(loaded.embed("text", TEXTS[:3]), model.embed("text", TEXTS[:3]))
    torch.testing.assert_close(loaded.embed("image", images()), model.embed("image", images()))
    assert loaded["image"].build_args["kwargs"]["pretrained"] is None


def test_a_model_without_pretrained_is_refused_and_the_error_says_what_to_pass():
    with pytest.raises(ConfigError) as err:
        create_encoder("open_clip_image", model="ViT-B-32")
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert str(err.value) == (
        f"pretrained: not given, so OpenCLIP's ViT-B-32 would start from random weights: pass pretrained=TAG "
        f"(ViT-B-32's tags include {', '.join(tags[:3])}; open_clip.list_pretrained_tags_by_model lists all "
        f"{len(tags)}) or a weights file, or random_init=True to train it from random weights on purpose"
    )
    assert "laion2b_s34b_b79k" in tags


def test_random_init_and_pretrained_together_are_refused():
    with pytest.raises(ConfigError, match=r"^random_init: pass pretrained='openai' or random_init=True, not both$"):
        create_encoder("open_clip_text", model="ViT-B-32", pretrained="openai", random_init=True)


def test_random_init_keeps_a_folders_architecture_not_its_weights(folder, reference, tmp_path):
    clip, _, _ = reference
    torch.manual_seed(1)
    tower = create_encoder("open_clip_text", path=str(folder), random_init=True).eval()
    theirs = clip.state_dict()
    ours = {k.removeprefix("trunk.clip."): v for k, v in tower.state_dict().items() if k.startswith("trunk.clip.")}
    assert ours and all(ours[k].shape == theirs[k].shape for k in ours)
    assert not torch.equal(ours["token_embedding.weight"], theirs["token_embedding.weight"])

    model = BindModel({"text": tower}, "text").eval()  # and it reloads as it was saved
    model.save_pretrained(tmp_path / "run")
    loaded = BindModel.from_pretrained(tmp_path / "run").eval()
    torch.testing.assert_close(loaded.embed("text", TEXTS[:3]), model.embed("text", TEXTS[:3]), atol=0, rtol=0)


def test_a_new_head_binds_into_another_size(folder):
    tower = create_encoder("open_clip_image", path=str(folder), head="linear", embed_dim=8)
    assert tower.embed(images()).shape == (3, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "ViT-B-33"}, "'ViT-B-33' is not an OpenCLIP architecture; did you mean 'ViT-B-32'"),
        ({"model": "ViT-B-32", "pretrained": "laion9b"}, "'laion9b' is neither a file nor a weights tag of OpenCLIP's ViT-B-32; its tags: "),
        ({"model": None}, "need model="),
    ],
)  # fmt: skip
def test_wrong_names_get_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        create_encoder("open_clip_image", **kwargs)
    assert "\n" not in str(err.value)


def test_a_folder_without_config_and_a_folder_with_pretrained_are_refused(folder, tmp_path):
    with pytest.raises(ConfigError, match="has no open_clip_config.json"):
        create_encoder("open_clip_text", path=str(tmp_path))
    with pytest.raises(ConfigError, match="not with path="):
        create_encoder("open_clip_text", path=str(folder), pretrained="openai")


def test_without_the_package_the_error_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    with pytest.raises(
        ConfigError, match=r"need the open_clip_torch package .*pip install -c constraints.txt -e '\.\[openclip\]'"
    ):
        create_encoder("open_clip_image", model="ViT-B-32")
