"""Pretrained towers by name, through the standard caches: Hugging Face hub ids, OpenCLIP tags and hub models,
torchvision weight names. This machine has no network: the caches are filled by the test, and a process started
with ``$HF_HUB_OFFLINE=1`` and its own ``$HF_HOME`` / ``$TORCH_HOME`` must load from them or say what to download.
So must a process that is not offline but whose hub does not answer (``$HF_ENDPOINT`` on a closed port): one
request, then the cache or one line, instead of huggingface_hub's retries (half a minute a file)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

from bind.registry import get_encoder_info
from encoders import _hf

pytest.importorskip("open_clip")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[1]
CLIP_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """This environment with its own Hugging Face cache, neither offline nor pointed elsewhere unless ``extra`` says."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    return {**env, "HF_HOME": str(hf_home), **extra}


def fill_hf_cache(home: Path, repo: str, folder: Path) -> None:
    """Lay out ``folder``'s files as huggingface_hub's cache holds repository ``repo`` at one commit."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from bind import create_encoder

    local_bert, local_clip = sys.argv[1], sys.argv[2]
    out = {}

    def features(enc, items):
        enc.eval()
        with torch.no_grad():
            return enc.forward_features(enc.collate([enc.preprocess(i) for i in items]))

    def attempt(key, fn):
        try:
            out[key] = fn()
        except Exception as err:
            out[key] = f"{type(err).__name__}: {err}"

    texts = ["a red bird", "seven"]
    attempt("hf_id", lambda: float((features(create_encoder("hf_text", path="tiny-org/tiny-bert"), texts)
                                    - features(create_encoder("hf_text", path=local_bert), texts)).abs().max()))
    attempt("hf_missing", lambda: create_encoder("hf_text", path="tiny-org/not-cached") and "loaded")
    attempt("open_clip_hub", lambda: float((create_encoder("open_clip_text", model="hf-hub:tiny-org/tiny-clip").eval().embed(texts)
                                            - create_encoder("open_clip_text", path=local_clip).eval().embed(texts)).abs().max()))
    attempt("open_clip_tag", lambda: create_encoder("open_clip_image", model="ViT-B-32", pretrained="laion2b_s34b_b79k") and "loaded")
    attempt("open_clip_hub_missing", lambda: create_encoder("open_clip_text", model="hf-hub:tiny-org/gone") and "loaded")
    def tv():
        enc = create_encoder("tv_resnet18", weights="IMAGENET1K_V1")
        return float(enc.trunk.conv1.weight.detach().sum())
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # torchvision's downloads are not Hugging Face's: only offline here
        attempt("tv_cached", tv)
        attempt("tv_missing", lambda: create_encoder("tv_resnet50", weights="IMAGENET1K_V2") and "loaded")
        attempt("tv_unknown", lambda: create_encoder("tv_resnet18", weights="IMAGENET9K") and "loaded")
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """What a process with pre-filled caches and ``$HF_HUB_OFFLINE=1`` got: values or error lines."""
    return run_child(tmp_path_factory.mktemp("hub"), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    """What a process with the same caches got when it is not offline but the hub refuses every connection."""
    port = closed_port()
    return {**run_child(tmp_path_factory.mktemp("hub"), HF_ENDPOINT=f"http://127.0.0.1:{port}"), "port": port}


def run_child(root: Path, **hub: str) -> dict:
    """Fill caches under ``root``, run CHILD with them and the ``hub`` variables; what each attempt gave."""
    local_bert = Path(get_encoder_info("hf_text").tiny_kwargs(root / "made")["path"])
    local_clip = Path(get_encoder_info("open_clip_text").tiny_kwargs(root / "made")["path"])
    fill_hf_cache(root / "hf", "tiny-org/tiny-bert", local_bert)
    fill_hf_cache(root / "hf", "tiny-org/tiny-clip", local_clip)
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), checkpoints / "resnet18-f37072fd.pth")  # the file name torchvision's URL has
    env = hub_env(root / "hf", TORCH_HOME=str(root / "torch"), **hub)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(local_bert), str(local_clip)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["resnet_conv1_sum"] = float(resnet.conv1.weight.detach().sum())
    result["root"] = str(root)
    return result


def test_hub_id_loads_from_the_cache_like_the_local_folder(offline):
    assert offline["hf_id"] == 0.0


def test_hub_id_not_cached_offline_says_what_to_download(offline):
    message = offline["hf_missing"]
    assert message.startswith("DataError: hf_text: 'tiny-org/not-cached' is not in the Hugging Face cache")
    assert f"({offline['root']}/hf/hub)" in message and "offline ($HF_HUB_OFFLINE=1)" in message
    assert "run `hf download tiny-org/not-cached`" in message and "\n" not in message


def test_open_clip_hub_model_loads_from_the_cache(offline):
    assert offline["open_clip_hub"] == 0.0


def test_open_clip_tag_not_cached_names_its_hub_repository_and_file(offline):
    assert offline["open_clip_tag"] == (
        f"DataError: pretrained: OpenCLIP ViT-B-32 laion2b_s34b_b79k is not in the Hugging Face cache "
        f"({offline['root']}/hf/hub) and this process is offline ($HF_HUB_OFFLINE=1): run `hf download {CLIP_REPO} "
        "open_clip_pytorch_model.bin` on a machine with network access (with the same $HF_HOME), or pass pretrained=FILE"
    )


def test_open_clip_hub_model_not_cached_names_the_model_key(offline):
    assert offline["open_clip_hub_missing"].startswith(
        "DataError: model: OpenCLIP hf-hub:tiny-org/gone is not in the Hugging Face cache"
    )
    assert offline["open_clip_hub_missing"].endswith("run `hf download tiny-org/gone` on a machine with network "
                                                     "access (with the same $HF_HOME), or pass path= (an OpenCLIP model folder)")  # fmt: skip


# ---- not offline, and the hub does not answer -------------------------------------------------------------------
def test_unreachable_hub_loads_cached_models_from_the_cache(unreachable):
    assert unreachable["hf_id"] == 0.0
    assert unreachable["open_clip_hub"] == 0.0


def test_unreachable_hub_and_not_cached_is_one_line_naming_the_endpoint(unreachable):
    endpoint = f"http://127.0.0.1:{unreachable['port']}"
    for key, lead in [("hf_missing", "hf_text: 'tiny-org/not-cached'"),
                      ("open_clip_tag", "pretrained: OpenCLIP ViT-B-32 laion2b_s34b_b79k")]:  # fmt: skip
        message = unreachable[key]
        assert message.startswith(f"DataError: {lead} is not in the Hugging Face cache ({unreachable['root']}/hf/hub)")
        assert f"and the hub ({endpoint}) did not answer (" in message and "\n" not in message
        assert "Retry" not in message


def test_torchvision_weights_name_loads_from_torch_hubs_cache(offline):
    assert offline["tv_cached"] == pytest.approx(offline["resnet_conv1_sum"], rel=1e-6)


def test_torchvision_weights_not_cached_offline_says_url_and_place(offline):
    message = offline["tv_missing"]
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    target = f"{offline['root']}/torch/hub/checkpoints/{url.rsplit('/', 1)[1]}"
    assert message == (
        f"DataError: weights: torchvision's ResNet50_Weights.IMAGENET1K_V2 is not in torch.hub's cache and this "
        f"process is offline ($HF_HUB_OFFLINE=1): download {url} to {target} on a machine with network access, "
        "or pass weights_path="
    )


def test_unknown_torchvision_weights_name_lists_the_known_ones(offline):
    assert offline["tv_unknown"] == (
        "ConfigError: weights: 'IMAGENET9K' is not one of torchvision's ResNet18_Weights: IMAGENET1K_V1, DEFAULT"
    )


@pytest.mark.parametrize(
    ("given", "kind"),
    [("sentence-transformers/all-MiniLM-L6-v2", str), ("bert-base-uncased", str), ("../models/x", None),
     ("a/b/c", None), ("org--name/x", None)],
)  # fmt: skip
def test_what_counts_as_a_hub_id(given, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if kind is None:
        with pytest.raises(_hf.DataError, match="neither a local Hugging Face model directory"):
            _hf.resolve_hf(given, "hf_text")
    else:
        assert _hf.resolve_hf(given, "hf_text") == given


def test_a_folder_without_config_is_not_taken_for_a_hub_id(tmp_path):
    (tmp_path / "org").mkdir()
    with pytest.raises(_hf.DataError, match="is a directory without config.json"):
        _hf.resolve_hf(tmp_path / "org", "hf_text")
