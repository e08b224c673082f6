"""The installed environment: every built-in encoder module and the audio backend import and run.

A broken wheel (torchaudio built for another torch, say) fails here with its own message, instead
of failing the collection of every test module that imports an encoder.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import encoders

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_MODULES = sorted(m.name for m in pkgutil.iter_modules(encoders.__path__) if not m.name.startswith("_"))


@pytest.mark.parametrize("module", BUILTIN_MODULES)
def test_builtin_encoder_module_imports(module):
    importlib.import_module(f"encoders.{module}")


def test_torchaudio_compiled_library_loads_and_computes():
    import torch
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    wave = torch.sin(torch.arange(16000) * 2 * torch.pi * 440 / 16000)[None]
    fbank = kaldi.fbank(wave, num_mel_bins=32, sample_frequency=16000)
    assert fbank.shape == (98, 32) and torch.isfinite(fbank).all()
    down = AF.resample(wave, 16000, 8000)
    assert down.shape == (1, 8000)
    # a 440 Hz tone keeps its energy through the resampler (the band edge is 4 kHz)
    assert abs(down.pow(2).mean().item() - 0.5) < 0.02


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^\s*\"?([A-Za-z0-9_.-]+)==([^\s;\",]+)", line)
        if m:
            out[m[1].lower()] = m[2]
    return out


def test_torch_family_pins_agree_with_the_lock_and_the_installed_versions():
    from importlib.metadata import version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"])
    locked = _pins((ROOT / "constraints.txt").read_text().splitlines())
    for name in ("torch", "torchvision", "torchaudio"):
        assert name in pinned, f"pyproject.toml must pin {name} exactly (name==version)"
        assert locked.get(name) == pinned[name], (
            f"constraints.txt locks {name} {locked.get(name)}, pyproject {pinned[name]}"
        )
        assert version(name).split("+")[0] == pinned[name], f"installed {name} {version(name)} is not the tested one"


def test_the_lock_covers_every_direct_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def canonical(name: str) -> str:  # PEP 503: open_clip_torch and open-clip-torch are one package
        return re.sub(r"[-_.]+", "-", name).lower()

    specs = [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]
    wanted = {canonical(re.split(r"[=<>\[ ;]", d, maxsplit=1)[0]) for d in specs}
    locked = {canonical(name) for name in _pins((ROOT / "constraints.txt").read_text().splitlines())}
    assert sorted(wanted - locked) == [], "regenerate constraints.txt (command in its first lines)"


def test_version_and_doctor():
    import bind

    out = subprocess.run([sys.executable, "-m", "bind", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"bindkit {bind.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", bind.__version__)
    doctor = subprocess.run([sys.executable, "-m", "bind", "doctor", "--json"], capture_output=True, text=True)
    import json

    info = json.loads(doctor.stdout)
    assert doctor.returncode == 0, info["problems"]
    assert info["packages"]["torch"] == importlib.import_module("torch").__version__.split("+")[0]
    assert info["torchaudio_library"] == "ok"
    assert set(info["extras"]) == {"faiss", "plot", "umap", "tensorboard"}


def test_a_broken_torchaudio_is_one_clear_line(tmp_path):
    """torchaudio built for another torch fails at import with an undefined symbol: towers that need no torchaudio
    still list and build; the first audio tower says so, once."""
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('Could not load this library: libtorchaudio.so: undefined symbol: _ZN3c1010Warning')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    listing = subprocess.run(
        [sys.executable, "-m", "bind", "encoders"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert listing.returncode == 0 and "audio_cnn" in listing.stdout, listing.stderr
    out = subprocess.run(
        [sys.executable, "-m", "bind", "check-encoder", "audio_cnn"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    said = out.stdout + out.stderr
    assert out.returncode == 1 and "Traceback" not in said, said  # check-encoder: 1 when a check fails
    line = next(line for line in said.splitlines() if "failed to import" in line)
    assert "torchaudio failed to import (OSError: Could not load this library" in line and "bindkit doctor" in line


def test_the_wheel_holds_what_a_user_needs(tmp_path):
    """`pip wheel .` (README's install into an existing project): both packages, the data digests the demo-data
    download verifies against, and the entry points (the command and the built-in encoders)."""
    import zipfile

    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("bindkit-*-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"bind/__init__.py", "bind/hub.py", "bind/data/fetch.py", "encoders/imagebind/__init__.py"} <= names
    digests = zipfile.ZipFile(wheel).read("bind/data/fsdd_v1.0.10.sha256").decode().splitlines()
    assert len(digests) == 2000 and all(
        re.fullmatch(r"[0-9a-f]{64}  fsdd/recordings/\d_\w+_\d+\.wav", d) for d in digests
    )
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "bindkit = bind.cli:main" in entry_points and "builtin = encoders" in entry_points
    assert not any(n.startswith(("tests/", "recipes/")) for n in names)
