"""``bindkit validate`` checks what ``bindkit run`` will need from this machine, and names the key of each refusal:
the weight files encoder arguments name (declared by the encoders' ``files=``), hub weights in the Hugging Face
cache when offline (their ``check_args=``), towers that would start from random weights unless asked, and
optional packages (the ``tensorboard`` key, the ``open_clip_*`` encoders)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import DATA_ROOT

import bind.registry
from bind import ConfigError, DataError, ModalityEncoder, register_encoder
from bind.recipe import load_recipe
from encoders.imagebind import CHECKPOINT_URL, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLIP_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def recipe_with(tmp_path: Path, modality: str, encoder: str, args: dict, **top) -> Path:
    """A recipe that pretrains the image modality (digits_cnn, or ``encoder`` if ``modality`` is "image") and
    holds ``modality`` with ``encoder`` and ``args``; ``top``: more top-level keys."""
    image = {"encoder": "digits_cnn", "train_data": {"source": "digit_captions"}}
    modalities = {"image": image}
    if modality == "image":
        image |= {"encoder": encoder, "args": args}
    else:
        modalities[modality] = {"encoder": encoder, "args": args, "freeze": "all"}
    data = {
        "anchor_modality": "image",
        "data_root": str(tmp_path),
        "modalities": modalities,
        "stages": [{"name": "s", "kind": "pretrain", "modality": "image", "steps": 2}],
        **top,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refusal(error: type[Exception], path: Path) -> str:
    with pytest.raises(error) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- weight files, declared by the encoders ------------------------------------------------------------------------
def test_a_missing_imagebind_checkpoint_names_the_key_and_the_download(tmp_path):
    path = recipe_with(tmp_path, "imu", "imagebind_imu", {"checkpoint": ".checkpoints/imagebind_huge.pth"})
    assert refusal(DataError, path) == (
        f"{path}: modalities.imu.args.checkpoint: .checkpoints/imagebind_huge.pth does not exist; download {CHECKPOINT_URL}"
    )


def test_an_existing_imagebind_checkpoint_validates(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pth")
    assert (
        "imu" in load_recipe(recipe_with(tmp_path, "imu", "imagebind_imu", {"checkpoint": str(checkpoint)})).modalities
    )


def test_a_missing_torchvision_weights_file_names_the_key(tmp_path):
    path = recipe_with(tmp_path, "image", "tv_resnet18", {"weights_path": "weights/resnet18.pt"})
    assert refusal(DataError, path) == (
        f"{path}: modalities.image.args.weights_path: weights/resnet18.pt does not exist; "
        "pass a state-dict file of the model, or weights= (a torchvision weights name)"
    )


@pytest.fixture
def scratch_registry(monkeypatch):
    """Encoders registered inside a test are gone after it."""
    monkeypatch.setattr(bind.registry, "_REGISTRY", dict(bind.registry._REGISTRY))


def test_a_plugins_files_are_checked_the_same_way(tmp_path, monkeypatch, scratch_registry):
    @register_encoder("smell", files={"weights": "ask the lab for smell.pt"})
    def smell_probe(weights: str | None = None, embed_dim: int = 8) -> ModalityEncoder:
        raise AssertionError("validate must not build the encoder")

    path = recipe_with(tmp_path, "smell", "smell_probe", {"weights": "smell.pt"})
    assert refusal(DataError, path) == (
        f"{path}: modalities.smell.args.weights: smell.pt does not exist; ask the lab for smell.pt"
    )
    (tmp_path / "smell.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # a relative path is read from the current folder, as the run will read it
    assert "smell" in load_recipe(path).modalities


def test_declaring_a_file_that_is_no_argument_is_refused_at_registration(scratch_registry):
    with pytest.raises(ConfigError, match=r"register_encoder\('typo_probe'\): files names wieghts, not arguments"):

        @register_encoder("smell", files={"wieghts": ""})
        def typo_probe(weights: str | None = None) -> ModalityEncoder:
            raise AssertionError


# ---- towers that would start from random weights ---------------------------------------------------------------
def test_an_imagebind_tower_without_checkpoint_is_refused_unless_random_init(tmp_path):
    path = recipe_with(tmp_path, "imu", "imagebind_imu", {})
    assert refusal(ConfigError, path) == (
        f"{path}: modalities.imu.args.checkpoint: not given, so ImageBind's imu tower would start from random "
        f"weights: pass checkpoint=PATH (imagebind_huge.pth, from {CHECKPOINT_URL}) or random_init=True to train "
        "imagebind_huge's architecture from random weights on purpose"
    )
    assert "imu" in load_recipe(recipe_with(tmp_path, "imu", "imagebind_imu", {"random_init": True})).modalities


def test_an_open_clip_model_without_pretrained_is_refused_unless_random_init(tmp_path):
    pytest.importorskip("open_clip")
    path = recipe_with(tmp_path, "text", "open_clip_text", {"model": "RN50"})
    assert refusal(ConfigError, path) == (
        f"{path}: modalities.text.args.pretrained: not given, so OpenCLIP's RN50 would start from random weights: "
        "pass pretrained=TAG (RN50's tags include openai, yfcc15m, cc12m; open_clip.list_pretrained_tags_by_model "
        "lists all 3) or a weights file, or random_init=True to train it from random weights on purpose"
    )
    random = recipe_with(tmp_path, "text", "open_clip_text", {"model": "RN50", "random_init": True})
    assert "text" in load_recipe(random).modalities


# ---- hub weights, when offline --------------------------------------------------------------------------------------
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """This process offline, with an empty Hugging Face cache (huggingface_hub reads both on each call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_uncached_hub_id_offline_names_the_key(tmp_path, offline_empty_cache):
    path = recipe_with(tmp_path, "text", "hf_text", {"path": "tiny-org/not-cached"})
    assert refusal(DataError, path) == (
        f"{path}: modalities.text.args.path: hf_text: 'tiny-org/not-cached' is not in the Hugging Face cache "
        f"({offline_empty_cache}) and this process is offline ($HF_HUB_OFFLINE=1): run `hf download "
        "tiny-org/not-cached` on a machine with network access (with the same $HF_HOME), or pass a local directory"
    )


def test_an_uncached_open_clip_tag_offline_names_the_key(tmp_path, offline_empty_cache):
    pytest.importorskip("open_clip")
    path = recipe_with(tmp_path, "text", "open_clip_text", {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    message = refusal(DataError, path)
    assert message.startswith(f"{path}: modalities.text.args.pretrained: OpenCLIP ViT-B-32 laion2b_s34b_b79k is not in")
    assert message.endswith(f"run `hf download {CLIP_REPO} open_clip_pytorch_model.bin` on a machine with network "
                            "access (with the same $HF_HOME), or pass pretrained=FILE")  # fmt: skip


def test_a_cached_open_clip_tag_offline_validates(tmp_path, offline_empty_cache):
    pytest.importorskip("open_clip")
    snapshot = offline_empty_cache / f"models--{CLIP_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"")  # validate looks, it does not load
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    path = recipe_with(tmp_path, "text", "open_clip_text", {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    assert "text" in load_recipe(path).modalities


def test_validate_offline_with_an_empty_cache_is_one_line_naming_the_key(tmp_path):
    """The shipped recipe, as a user runs it: exit 2 and the one line of what to download."""
    pytest.importorskip("open_clip")
    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_ENDPOINT")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bind", "validate", "recipes/clip_audio.yaml", f"data_root={DATA_ROOT}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "bindkit validate: error: recipes/clip_audio.yaml: modalities.image.args.pretrained: OpenCLIP ViT-B-32 "
        f"laion2b_s34b_b79k is not in the Hugging Face cache ({tmp_path}/hf/hub) and this process is offline "
        f"($HF_HUB_OFFLINE=1): run `hf download {CLIP_REPO} open_clip_pytorch_model.bin` on a machine with network "
        "access (with the same $HF_HOME), or pass pretrained=FILE"
    ]


def test_run_with_an_unreachable_hub_and_an_empty_cache_is_one_line(tmp_path):
    """Not offline, but the hub refuses every connection: one request, then one line (no retries, no traceback)."""
    pytest.importorskip("open_clip")
    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    from test_hub import closed_port, hub_env

    endpoint = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "bind", "run", "recipes/clip_audio.yaml", f"data_root={DATA_ROOT}", "num_workers=0",
         "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=REPO, env=hub_env(tmp_path / "hf", HF_ENDPOINT=endpoint), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(
        "bindkit run: error: recipes/clip_audio.yaml: modalities.image.args.pretrained: OpenCLIP ViT-B-32 "
        "laion2b_s34b_b79k is not in the Hugging Face cache "
        f"({tmp_path}/hf/hub) and the hub ({endpoint}) did not answer ("
    )
    assert line.endswith(f"run `hf download {CLIP_REPO} open_clip_pytorch_model.bin` on a machine with network "
                         "access (with the same $HF_HOME), or pass pretrained=FILE")  # fmt: skip


# ---- optional packages ------------------------------------------------------------------------------------------
def fake_package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def test_tensorboard_true_needs_the_package(tmp_path, monkeypatch):
    path = recipe_with(tmp_path, "imu", "imagebind_imu", {"random_init": True}, tensorboard=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importlib.util.find_spec now finds nothing
    assert refusal(ConfigError, path) == (
        f"{path}: tensorboard: true needs the tensorboard package: pip install -c constraints.txt -e '.[tensorboard]'"
    )
    monkeypatch.setitem(sys.modules, "tensorboard", fake_package("tensorboard"))
    assert load_recipe(path).tensorboard is True


def test_open_clip_encoders_need_their_package(tmp_path, monkeypatch):
    path = recipe_with(tmp_path, "text", "open_clip_text", {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    message = refusal(ConfigError, path)
    assert message.startswith(f"{path}: modalities.text.encoder: the open_clip_* encoders need the open_clip_torch ")
    assert message.endswith(": pip install -c constraints.txt -e '.[openclip]'")
