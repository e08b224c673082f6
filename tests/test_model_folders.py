"""A model without training: assembled from towers, saved, used by every command, shared by hub id.

A folder written by ``BindModel.save_pretrained`` (no recipe.yaml) is a model each command taking one accepts;
a hub repository holding such a folder is the same model by id, read through huggingface_hub's cache (filled
here as huggingface_hub lays it out: snapshot files are links into ``blobs/``), offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA_ROOT

from bind import create_encoder
from bind.cli import main
from bind.errors import ConfigError, DataError
from bind.hub import CARD_MARK, is_hub_id, resolve_model
from bind.inputs import glob_files, walk_files
from bind.model import BindModel
from bind.registry import get_encoder_info
from bind.runs import load_run
from encoders.imagebind import save_tiny_checkpoint

RECORDINGS = DATA_ROOT / "fsdd" / "recordings"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def bindkit(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def fill_hub_cache(hf_home: Path, repo: str, folder: Path) -> Path:
    """``folder`` as huggingface_hub caches repository ``repo``: content in ``blobs/<sha256>``, the snapshot's
    files relative links to them, ``refs/main`` naming the commit. Returns the snapshot folder."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def imagebind_folder(tmp_path_factory) -> Path:
    """ImageBind's format (the tiny stand-in) assembled into a model with no training: image, text and audio."""
    root = tmp_path_factory.mktemp("imagebind")
    checkpoint = save_tiny_checkpoint(root / "imagebind_tiny.pth")
    towers = {m: f"imagebind_{m}" for m in ("image", "text", "audio")}
    model = BindModel.from_encoders(towers, checkpoint=str(checkpoint), num_heads=2)
    return model.save_pretrained(root / "model")


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory) -> Path:
    """Ten MNIST digits as PNG files in nested folders, as a person keeps photos."""
    from PIL import Image

    from bind.data.digits import read_idx

    images = read_idx(DATA_ROOT / "mnist" / "images-idx3-ubyte.gz")[:10]
    labels = read_idx(DATA_ROOT / "mnist" / "labels-idx1-ubyte.gz")[:10]
    root = tmp_path_factory.mktemp("photos")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("even" if label % 2 == 0 else "odd") / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}_digit{label}.png")
    return root


# ---- assembling and saving ---------------------------------------------------------------------------------------
def test_from_encoders_builds_the_named_towers_with_shared_arguments(imagebind_folder):
    checkpoint = imagebind_folder.parent / "imagebind_tiny.pth"
    model = BindModel.from_encoders(
        {"image": "imagebind_image", "audio": ("imagebind_audio", {"num_heads": 2})},
        checkpoint=str(checkpoint),
        num_heads=2,
    )
    assert model.anchor_modality == "image" and model.modalities == ["image", "audio"]
    alone = create_encoder("imagebind_audio", checkpoint=str(checkpoint), num_heads=2).eval()
    wav = [str(RECORDINGS / "7_nicolas_0.wav")]
    assert torch.equal(model.eval().embed("audio", wav), alone.embed(wav))


def test_the_saved_folder_reloads_to_the_same_embeddings(imagebind_folder):
    checkpoint = imagebind_folder.parent / "imagebind_tiny.pth"
    fresh = create_encoder("imagebind_text", checkpoint=str(checkpoint), num_heads=2).eval()
    loaded = BindModel.from_pretrained(imagebind_folder)
    texts = ["someone says seven", "a dog barks"]
    assert torch.allclose(loaded.embed("text", texts), fresh.embed(texts), atol=1e-6)


def test_the_model_card_describes_the_model_and_keeps_a_persons_edits(imagebind_folder, tmp_path):
    card = (imagebind_folder / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "bindkit"
    assert meta["bindkit"]["encoders"] == {
        "image": "imagebind_image",
        "text": "imagebind_text",
        "audio": "imagebind_audio",
    }
    assert meta["bindkit"]["embed_dim"] == 16 and meta["bindkit"]["anchor_modality"] == "image"
    assert 'BindModel.from_pretrained("model")' in body
    model = BindModel.from_pretrained(imagebind_folder)
    (tmp_path / "eval.json").write_text(
        json.dumps({"prompt_modality": "text", "zero_shot": {"audio": {"accuracy": 0.625, "pair": "emergent"}},
                    "retrieval": {"audio->image": {"R@1": 0.5, "pair": "trained"}}})
    )  # fmt: skip
    model.save_pretrained(tmp_path, card_name="my-org/space")
    meta = yaml.safe_load((tmp_path / "README.md").read_text().split("---\n", 2)[1])
    assert meta["bindkit"]["eval"] == {"zero_shot/audio": 0.625, "R@1/audio->image": 0.5}
    assert 'from_pretrained("my-org/space")' in (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    assert CARD_MARK not in (tmp_path / "README.md").read_text()


# ---- every command takes a model folder -----------------------------------------------------------------------
def test_embed_and_retrieve_take_a_model_folder_without_recipe(imagebind_folder, digit_images, tmp_path, capsys):
    """ImageBind's towers, no training: audio -> image search from the command line and from Python agree."""
    assert not (imagebind_folder / "recipe.yaml").exists()
    out = tmp_path / "photos.npy"
    code, stdout, err = bindkit(capsys, "embed", imagebind_folder, "--modality", "image", "--out", out, digit_images)
    assert code == 0, err
    names = (tmp_path / "photos.names.txt").read_text().splitlines()
    assert len(names) == 10 and names == sorted(names) and all("/scans/" in n for n in names)  # subfolders read
    model = BindModel.from_pretrained(imagebind_folder)
    np.testing.assert_allclose(np.load(out), model.encode("image", digit_images), atol=1e-6)  # a folder, as the CLI
    query = RECORDINGS / "7_nicolas_0.wav"
    code, stdout, err = bindkit(
        capsys, "retrieve", imagebind_folder, "--query-modality", "audio", "--query", query,
        "--gallery-modality", "image", "--gallery-embeddings", out, "--top-k", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    hits = json.loads(stdout)[0]["results"]
    scores = np.load(out) @ model.encode("audio", str(query))
    best = np.argsort(-scores, kind="stable")[:3]
    assert [h["item"] for h in hits] == [names[i] for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=1e-5)


def test_eval_and_plot_score_a_model_folder_on_a_manifest(imagebind_folder, digit_images, tmp_path, capsys):
    code, _, err = bindkit(capsys, "eval", imagebind_folder)
    assert code == 2 and "has no eval data of its own; pass --data MANIFEST" in err and "\n" not in err.strip()
    images = sorted(digit_images.rglob("*.png"))
    rows = ["image,audio,label"] + [
        f"{p},{RECORDINGS / (p.stem.split('digit')[1] + '_jackson_0.wav')},{p.stem.split('digit')[1]}" for p in images
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    code, stdout, err = bindkit(capsys, "eval", imagebind_folder, "--data", tmp_path / "pairs.csv", "--json")
    assert code == 0, err
    results = json.loads(stdout)
    assert set(results["retrieval"]) == {"image->audio", "audio->image"}  # the manifest's modalities only
    model = BindModel.from_pretrained(imagebind_folder)
    z_image, z_audio = (
        model.encode("image", [str(p) for p in images]),
        model.encode("audio", [r.split(",")[1] for r in rows[1:]]),
    )
    labels = np.array([int(r.split(",")[2]) for r in rows[1:]])
    top = np.argmax(z_audio @ z_image.T, axis=1)
    assert results["retrieval"]["audio->image"]["R@1"] == pytest.approx(np.mean(labels[top] == labels), abs=1e-6)
    pytest.importorskip("matplotlib")
    code, stdout, err = bindkit(
        capsys, "plot", imagebind_folder, "--data", tmp_path / "pairs.csv", "--out", tmp_path / "s.png"
    )
    assert code == 0, err
    assert "20 points" in stdout and (tmp_path / "s.png").stat().st_size > 1000


def test_eval_data_only_scores_the_manifests_modalities_of_a_run(tiny_run, tmp_path, capsys):
    wavs = sorted(RECORDINGS.glob("*_jackson_0.wav"))
    rows = ["audio,label"] + [f"{w},{w.name.split('_')[0]}" for w in wavs]
    (tmp_path / "j.csv").write_text("\n".join(rows) + "\n")
    code, _, err = bindkit(capsys, "eval", tiny_run, "--data", tmp_path / "j.csv", "--data-only")
    assert code == 2 and "data of 1 modality (audio)" in err and "add a column of another one" in err
    code, stdout, err = bindkit(capsys, "eval", tiny_run, "--data", tmp_path / "j.csv", "--json", "--no-progress")
    assert code == 0, err
    results = json.loads(stdout)
    assert "sets" not in results  # the run's extra eval sets are not the user's files
    assert "audio->image" in results["retrieval"] and "audio" in results["zero_shot"]


# ---- hub ids -------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from bind.model import BindModel
    out = {}
    wav = sys.argv[1]
    for ref in ("tiny-org/bound-space", sys.argv[2], "tiny-org/not-cached"):
        try:
            model = BindModel.from_pretrained(ref)
            out[ref] = model.encode("audio", wav).tolist() + model.encode("text", ["seven"]).ravel().tolist()
        except Exception as err:
            out[ref] = f"{type(err).__name__}: {err}"
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, imagebind_folder):
    root = tmp_path_factory.mktemp("hub")
    # a text tower that exports assets (tokenizer, HF config): links in the snapshot lead into blobs/
    text = {**get_encoder_info("hf_text").tiny_kwargs(root / "scratch"), "embed_dim": 16}
    model = BindModel.from_encoders(
        {"audio": ("imagebind_audio", {"num_heads": 2}), "text": ("hf_text", text)},
        checkpoint=str(imagebind_folder.parent / "imagebind_tiny.pth"),
    )
    folder = model.save_pretrained(root / "folder")
    snapshot = fill_hub_cache(root / "hf", "tiny-org/bound-space", folder)
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return {"root": root, "folder": folder, "snapshot": snapshot, "env": env}


def test_a_hub_id_loads_from_the_cache_offline_like_the_folder(hub):
    wav = str(RECORDINGS / "7_nicolas_0.wav")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, wav, str(hub["folder"])], env=hub["env"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(out["tiny-org/bound-space"], list), out["tiny-org/bound-space"]
    np.testing.assert_allclose(out["tiny-org/bound-space"], out[str(hub["folder"])], atol=1e-6)
    message = out["tiny-org/not-cached"]
    assert message.startswith("DataError: tiny-org/not-cached: no such directory, and as a Hugging Face hub id")
    assert f"not in the Hugging Face cache ({hub['root']}/hf/hub)" in message
    assert "offline ($HF_HUB_OFFLINE=1)" in message and "`hf download tiny-org/not-cached`" in message


def test_every_command_takes_a_hub_id(hub, tmp_path):
    out = tmp_path / "q.npy"
    done = subprocess.run(
        [sys.executable, "-m", "bind", "embed", "tiny-org/bound-space", "--modality", "text", "--out", str(out), "seven", "nine"],
        env=hub["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    local = BindModel.from_pretrained(hub["folder"]).encode("text", ["seven", "nine"])
    np.testing.assert_allclose(np.load(out), local, atol=1e-6)


def test_a_hub_snapshot_may_link_into_its_blobs_but_not_out_of_its_repository(hub):
    from bind.model_files import paths_inside

    snapshot, repo = hub["snapshot"], hub["snapshot"].parents[1]
    assert resolve_model(snapshot).confine == snapshot  # a plain folder is confined to itself
    vocab = next(p for p in (snapshot / "assets" / "text").iterdir() if p.is_symlink())
    relative = str(vocab.relative_to(snapshot))
    kwargs = {"vocab_path": relative, "nested": {"path": "assets/text"}}
    resolved = paths_inside(kwargs, snapshot, "config.json: kwargs", confine=repo)
    assert Path(resolved["vocab_path"]).parent == repo / "blobs" and resolved["nested"]["path"] == str(
        snapshot / "assets/text"
    )
    with pytest.raises(DataError, match=f"config.json: kwargs.vocab_path: '{relative}' resolves to .*blobs.*, outside"):
        paths_inside(kwargs, snapshot, "config.json: kwargs")  # without confine: the link leaves the folder
    with pytest.raises(DataError, match="kwargs.vocab_path: '../../blobs/.*outside"):  # written outside: refused
        paths_inside({"vocab_path": os.path.relpath(vocab.resolve(), snapshot)}, snapshot, "config.json: kwargs", repo)


@pytest.mark.parametrize(
    ("text", "hub_id"),
    [("org/name", True), ("org/name@v1.0", True), ("runs", False), ("../org/name", False), ("a/b/c", False),
     ("org--x/name", False), ("/abs/path", False)],
)  # fmt: skip
def test_what_counts_as_a_hub_id(text, hub_id):
    assert is_hub_id(text) is hub_id


def test_a_missing_local_folder_that_is_no_hub_id_says_so(tmp_path):
    with pytest.raises(DataError, match="no such directory; expected a model folder .* or a Hugging Face hub id"):
        BindModel.from_pretrained(tmp_path / "nowhere" / "deeper" / "x")


def test_push_to_hub_uploads_a_folder_that_loads_as_the_model(hub, monkeypatch, tmp_path):
    import huggingface_hub

    pushed = {}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        pushed["repo"], pushed["private"], pushed["exist_ok"] = repo_id, private, exist_ok

    def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
        import shutil

        shutil.copytree(folder_path, tmp_path / "uploaded")
        pushed["patterns"] = allow_patterns
        return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = BindModel.from_pretrained(hub["folder"])
    url = model.push_to_hub("my-org/space", private=True)
    assert url == "https://hub.example/my-org/space/commit/1"
    assert pushed["repo"] == "my-org/space" and pushed["private"] is True and pushed["exist_ok"] is True
    again = BindModel.from_pretrained(tmp_path / "uploaded")
    np.testing.assert_array_equal(again.encode("text", ["seven"]), model.encode("text", ["seven"]))
    assert 'from_pretrained("my-org/space")' in (tmp_path / "uploaded" / "README.md").read_text()
    with pytest.raises(DataError, match="not a hub repository id"):
        model.push_to_hub("not an id")


# ---- inputs as people have them -------------------------------------------------------------------------------------
def test_folders_are_read_recursively_and_a_symlink_cycle_is_walked_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.wav", "a/b/2.wav", "a/b/3.txt", "a/.hidden.wav", "top.wav"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path)  # a cycle
    (tmp_path / "a" / "b" / "again").symlink_to(tmp_path / "a")  # the same folder by another name
    (tmp_path / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    found = walk_files(tmp_path, (".wav",))
    assert [Path(f).relative_to(tmp_path).as_posix() for f in found] == ["a/1.wav", "a/b/2.wav", "top.wav"]
    assert glob_files(f"{tmp_path}/**/*.wav") == found
    assert glob_files(f"{tmp_path}/a/*.wav") == [str(tmp_path / "a" / "1.wav")]
    assert glob_files(f"{tmp_path}/**/[12].wav") == found[:2]


def test_encode_takes_a_folder_like_the_command_line(tiny_run, tmp_path):
    model, _ = load_run(tiny_run)
    (tmp_path / "memos" / "monday").mkdir(parents=True)
    wavs = sorted(RECORDINGS.glob("7_nicolas_[0-2].wav"))
    for i, wav in enumerate(wavs):
        (tmp_path / "memos" / ("monday" if i else "") / wav.name).write_bytes(wav.read_bytes())
    z = model.encode("audio", tmp_path / "memos")
    order = [tmp_path / "memos" / wavs[0].name, *(tmp_path / "memos" / "monday" / w.name for w in wavs[1:])]
    np.testing.assert_allclose(z, model.encode("audio", [str(p) for p in order]), atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: the folder .* holds no audio files"):
        model.encode("audio", tmp_path / "empty")


def test_nproc_beyond_the_machine_is_refused_in_one_line(monkeypatch):
    from bind.distributed import check_nproc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    check_nproc(2)
    with pytest.raises(ConfigError, match=r"--nproc 8: no CUDA device and 2 CPU core\(s\) here; .*--nproc 2 or fewer"):
        check_nproc(8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_nproc(4)
    with pytest.raises(ConfigError, match=r"--nproc 8: this machine has 4 CUDA device\(s\)"):
        check_nproc(8)


def test_a_failing_worker_under_nproc_is_one_line_per_process_and_no_torchrun_traceback(tmp_path):
    from test_bad_input import tiny_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))  # validates, but its image files do not exist
    (tmp_path / "pairs.csv").write_text("image\na.png\nb.png\n")
    done = subprocess.run(
        [sys.executable, "-m", "bind", "run", str(recipe), "--out", str(tmp_path / "run"), "--nproc", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("bindkit run: error:")]
    assert errors[-1].startswith("bindkit run: error: 2 of 2 processes failed, first rank ")
    assert "(exit code 2); its error is above" in errors[-1]
    assert any("a.png" in line for line in errors[:-1])  # each worker's own line names the file


def test_a_recipe_without_stages_assembles_imagebinds_space_into_a_model_folder(imagebind_folder, tmp_path):
    """recipes/imagebind.yaml with the tiny stand-in in the checkpoint's place: nothing trains, the folder holds
    the seven towers (video on the image tower's trunk, stored once) with the checkpoint's weights."""
    from bind.recipe import load_recipe
    from bind.train.trainer import run_recipe

    checkpoint = imagebind_folder.parent / "imagebind_tiny.pth"
    recipe = Path(__file__).parents[1] / "recipes" / "imagebind.yaml"
    modalities = yaml.safe_load(recipe.read_text())["modalities"]
    overrides = ["embed_dim=16"] + [
        f"modalities.{m}.args={{checkpoint: {checkpoint}, num_heads: 2}}" for m in modalities
    ]
    results = run_recipe(load_recipe(recipe, overrides), tmp_path / "ib", show_progress=False)
    assert results["retrieval"] == {} and not (tmp_path / "ib" / "checkpoints").exists()
    model = BindModel.from_pretrained(tmp_path / "ib")
    assert model.modalities == ["image", "video", "text", "audio", "depth", "thermal", "imu"]
    assert model["video"].trunk is model["image"].trunk
    fresh = create_encoder("imagebind_audio", checkpoint=str(checkpoint), num_heads=2).eval()
    wav = [str(RECORDINGS / "3_george_9.wav")]
    assert torch.allclose(model.eval().embed("audio", wav), fresh.embed(wav), atol=1e-6)
    assert "imagebind_imu" in (tmp_path / "ib" / "README.md").read_text()
