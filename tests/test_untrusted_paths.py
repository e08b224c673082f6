"""A saved model's config.json may come from anyone: every argument an encoder declares as a file
(``register_encoder(files=...)``, :class:`bind.registry.FileArg`) is read only from inside the model's folder,
for the encoders a factory builds in turn too, and ``bindkit validate`` checks the same declarations exist.
A config naming ``/etc/passwd``, ``../x.pth`` or a link out is refused in one line naming the file and the key,
before anything is opened; a model written by ``save_pretrained`` loads as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import bind.registry
import encoders.imagebind
from bind import DataError, ModalityEncoder, register_encoder
from bind.model import BindModel
from bind.recipe import load_recipe
from bind.registry import FileArg, get_encoder_info
from encoders.imagebind import save_tiny_checkpoint


@pytest.fixture
def opened(monkeypatch):
    """The ImageBind checkpoints read from now on."""
    paths: list[str] = []
    read = encoders.imagebind.read_checkpoint

    def spy(path):
        paths.append(str(path))
        return read(path)

    monkeypatch.setattr(encoders.imagebind, "read_checkpoint", spy)
    return paths


@pytest.fixture
def run(tmp_path) -> Path:
    """A saved ImageBind model (image, text, audio towers of the tiny checkpoint) and, beside its folder, a
    checkpoint that would load if it were followed."""
    checkpoint = save_tiny_checkpoint(tmp_path / "outside.pth")
    towers = {m: f"imagebind_{m}" for m in ("image", "text", "audio")}
    torch.manual_seed(0)
    return BindModel.from_encoders(towers, checkpoint=str(checkpoint), num_heads=2).save_pretrained(tmp_path / "run")


def edit_config(run: Path, modality: str, spec: dict) -> None:
    config = json.loads((run / "config.json").read_text())
    config["encoders"][modality] = spec
    (run / "config.json").write_text(json.dumps(config))


def test_a_saved_imagebind_model_loads_and_embeds_as_saved(run, opened):
    config = json.loads((run / "config.json").read_text())
    assert config["encoders"]["image"]["kwargs"]["checkpoint"] is None  # the sizes are in config=, weights saved
    assert config["encoders"]["text"]["kwargs"]["bpe_path"].startswith("assets/text/")  # a declared file, inside
    torch.manual_seed(1)
    saved = BindModel.from_encoders(
        {m: f"imagebind_{m}" for m in ("image", "text", "audio")},
        checkpoint=str(run.parent / "outside.pth"),
        num_heads=2,
    )
    opened.clear()
    model = BindModel.from_pretrained(run)
    assert opened == []
    texts = ["a dog", "two cats"]
    assert torch.allclose(model.embed("text", texts), saved.embed("text", texts), atol=1e-6)


@pytest.mark.parametrize("kind", ["system file", "relative", "symlink"])
def test_a_checkpoint_outside_the_folder_is_refused_before_it_is_opened(run, opened, kind):
    outside = run.parent / "outside.pth"
    if kind == "system file":
        written, target = "/etc/passwd", Path("/etc/passwd").resolve()
    elif kind == "relative":
        written, target = "../outside.pth", outside
    else:
        (run / "assets" / "image").mkdir(parents=True)
        (run / "assets" / "image" / "imagebind.pth").symlink_to(outside)
        written, target = "assets/image/imagebind.pth", outside
    edit_config(run, "image", {"name": "imagebind_image", "kwargs": {"checkpoint": written, "num_heads": 2}})
    with pytest.raises(DataError) as err:
        BindModel.from_pretrained(run)
    message = str(err.value)
    assert message.startswith(
        f"{run / 'config.json'}: encoders.image.kwargs.checkpoint: {written!r} resolves to {target}, outside "
    )
    assert "\n" not in message
    assert opened == []


def test_a_checkpoint_inside_the_folder_is_read_from_there(run, opened):
    (run / "weights").mkdir()
    shutil.copyfile(run.parent / "outside.pth", run / "weights" / "imagebind.pth")
    edit_config(
        run, "image", {"name": "imagebind_image", "kwargs": {"checkpoint": "weights/imagebind.pth", "num_heads": 2}}
    )
    model = BindModel.from_pretrained(run)
    assert set(opened) == {str((run / "weights" / "imagebind.pth").resolve())}
    assert model["image"].cfg["width"] == 32


def test_the_files_of_an_encoder_a_factory_builds_are_confined_too(run, opened):
    frames = {
        "frame_encoder": "imagebind_image",
        "frame_encoder_kwargs": {"checkpoint": "../outside.pth", "num_heads": 2},
    }
    edit_config(run, "video", {"name": "video_frames", "kwargs": {**frames, "embed_dim": 16}})
    with pytest.raises(DataError) as err:
        BindModel.from_pretrained(run)
    assert str(err.value).startswith(
        f"{run / 'config.json'}: encoders.video.kwargs (imagebind_image).checkpoint: '../outside.pth' resolves to "
    )
    assert opened == []


def test_an_open_clip_weights_file_outside_the_folder_is_refused(run, tmp_path):
    pytest.importorskip("open_clip")
    (tmp_path / "weights.bin").write_bytes(b"")
    for written in ("../weights.bin", "/etc/passwd"):
        edit_config(run, "image", {"name": "open_clip_image", "kwargs": {"model": "RN50", "pretrained": written}})
        with pytest.raises(
            DataError, match=rf"encoders\.image\.kwargs\.pretrained: '{written}' resolves to .*, outside"
        ):
            BindModel.from_pretrained(run)


def test_a_saved_open_clip_model_loads(tmp_path):
    pytest.importorskip("open_clip")
    kwargs = get_encoder_info("open_clip_text").tiny_kwargs(tmp_path)
    torch.manual_seed(0)
    saved = BindModel.from_encoders({"text": ("open_clip_text", kwargs)})
    folder = saved.save_pretrained(tmp_path / "run")
    assert json.loads((folder / "config.json").read_text())["encoders"]["text"]["kwargs"]["path"] == "assets/text"
    texts = ["a dog", "two cats"]
    assert torch.allclose(BindModel.from_pretrained(folder).embed("text", texts), saved.embed("text", texts), atol=1e-6)


# ---- the policy, on a plugin's declarations --------------------------------------------------------------------------
@pytest.fixture
def smell(monkeypatch):
    """A plugin encoder whose ``weights`` is a file or a name (as OpenCLIP's ``pretrained``); what it was given."""
    monkeypatch.setattr(bind.registry, "_REGISTRY", dict(bind.registry._REGISTRY))
    given: list[str | None] = []

    @register_encoder("smell", files={"weights": FileArg("ask the lab", or_name=True), "lab": FileArg(folder=True)})
    def smell_probe(weights: str | None = None, lab: str | None = None, embed_dim: int = 16) -> ModalityEncoder:
        given.append(weights)
        return ModalityEncoder("smell", torch.nn.Linear(4, 4), 4, embed_dim)

    return given


def smell_model(tmp_path: Path, weights: str) -> Path:
    torch.manual_seed(0)
    folder = BindModel.from_encoders({"smell": ("smell_probe", {})}).save_pretrained(tmp_path / "smell_run")
    edit_config(folder, "smell", {"name": "smell_probe", "kwargs": {"weights": weights}})
    return folder


def test_a_name_is_passed_on_a_file_is_resolved_inside_and_a_path_out_is_refused(smell, tmp_path, monkeypatch):
    folder = smell_model(tmp_path, "tag-v1")
    BindModel.from_pretrained(folder)
    assert smell[-1] == "tag-v1"  # no such file anywhere: a name the factory looks up
    (folder / "w.pt").write_bytes(b"")
    smell_model(tmp_path, "w.pt")
    BindModel.from_pretrained(folder)
    assert smell[-1] == str((folder / "w.pt").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "v.pt").write_bytes(b"")
    monkeypatch.chdir(elsewhere)  # a file of that name in the current folder is not read in the model folder's stead
    smell_model(tmp_path, "v.pt")
    BindModel.from_pretrained(folder)
    assert smell[-1] == str(folder.resolve() / "v.pt")
    smell_model(tmp_path, "../elsewhere/v.pt")
    with pytest.raises(DataError, match=r"encoders\.smell\.kwargs\.weights: '\.\./elsewhere/v\.pt' resolves to"):
        BindModel.from_pretrained(folder)


def test_validate_checks_a_declared_folder_and_leaves_a_name_to_the_encoder(smell, tmp_path):
    def recipe(args: dict) -> Path:
        modalities = {"image": {"encoder": "digits_cnn"}, "smell": {"encoder": "smell_probe", "args": args}}
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"anchor_modality": "image", "modalities": modalities, "stages": []}))
        return path

    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match=r"r\.yaml: modalities\.smell\.args\.lab: lab does not exist$"):
        load_recipe(recipe({"lab": "lab"}))
    with pytest.raises(DataError, match=r"modalities\.smell\.args\.lab: .*file is not a folder$"):
        load_recipe(recipe({"lab": str(tmp_path / "file")}))
    with pytest.raises(DataError, match=r"modalities\.smell\.args\.weights: w/x\.pt does not exist; ask the lab$"):
        load_recipe(recipe({"weights": "w/x.pt"}))
    assert "smell" in load_recipe(recipe({"lab": str(tmp_path), "weights": "tag-v1"})).modalities
