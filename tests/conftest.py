"""Shared fixtures: raw example inputs per modality (from the encoders' own example_inputs), and the real data root."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch

DATA_ROOT = Path(os.environ.get("BINDKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"

SMOKE = [
    "num_workers=0",
    "embed_dim=16",
    "modalities.image.args.width=4",
    "modalities.audio.args.width=4",
    "modalities.audio.args.depth=2",
    "modalities.video.args.frame_encoder_kwargs.width=4",
    "modalities.image.train_data.args.limit=256",
    "modalities.audio.train_data.args.limit=64",
    "modalities.video.train_data.args.limit=64",
    "eval.max_items=40",
    "stages.0.epochs=null",
    "stages.0.steps=2",
    "stages.0.batch_size=64",
    "stages.1.epochs=null",
    "stages.1.steps=2",
    "stages.1.batch_size=32",
    "stages.2.steps=3",
    "stages.2.pairs.audio.batch_size=16",
    "stages.2.pairs.video.batch_size=8",
    "stages.2.pairs.text.batch_size=16",
]

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config) -> None:
    """A broken install (torchaudio built for another torch) is one clear line, not a collection error per file."""
    from bind.errors import ConfigError
    from bind.registry import load_builtin_encoders

    try:
        load_builtin_encoders()
    except ConfigError as err:
        raise pytest.UsageError(str(err)) from None


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """A skipped CUDA test must not read as a pass: say, last and in red, that the GPU code did not run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "cuda" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_sep(
            "!", f"{len(skipped)} CUDA tests SKIPPED: no CUDA device here, the GPU code paths were NOT tested", red=True
        )
        terminalreporter.write_line("run them on a GPU machine: bindkit bench gpu (or pytest -m cuda)", red=True)


def spawn_gloo(worker, *args, nprocs: int = 2) -> None:
    """``worker(rank, dist, *args)`` in ``nprocs`` processes joined in one gloo group on 127.0.0.1 (one thread each).
    A worker's failed assert comes back as the spawn's error, with its traceback; a port another process took
    between picking and binding it is picked again."""
    for attempt in range(3):
        try:
            torch.multiprocessing.spawn(_gloo_worker, args=(nprocs, _free_port(), worker, args), nprocs=nprocs)
            return
        except torch.multiprocessing.ProcessRaisedException as err:
            if "address already in use" not in str(err).lower() or attempt == 2:
                raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, worker, args: tuple) -> None:
    from bind.distributed import barrier, init_distributed, shutdown_distributed

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist = init_distributed("cpu", timeout_s=120)
    try:
        worker(rank, dist, *args)
        barrier()  # rank 0 hosts the store: nobody leaves while another still talks to it
    finally:
        shutdown_distributed()


@pytest.fixture(autouse=True)
def _own_cache_folder(tmp_path_factory, monkeypatch):
    """Each test its own bindkit cache folder (bind.budget's tower sizes): none reads what another wrote, and the
    user's ~/.cache is left alone."""
    monkeypatch.setenv("BINDKIT_CACHE", str(tmp_path_factory.mktemp("bindkit-cache")))


def raw_examples(modality: str, n: int = 3, seed: int = 0) -> list:
    """``n`` raw items of ``modality``, as a user would pass them to ``embed``: the ``example_inputs`` of the
    tiny variant of an encoder registered for it (plugins' modalities included)."""
    return _example_encoder(modality).example_inputs(n, seed=seed)


@functools.cache
def _example_encoder(modality: str):
    """The tiny variant of one encoder of ``modality``: from-scratch built-ins first (cheapest to build)."""
    from bind import ModalityEncoder
    from bind.registry import create_encoder, get_encoder_info, list_encoders

    def cost(name: str) -> tuple:
        info = get_encoder_info(name)
        return (info.pretrained != "none", not info.module.startswith("encoders"), name)

    names = sorted(list_encoders(modality=modality), key=cost)
    if not names:
        raise KeyError(f"no encoder is registered for modality {modality!r}")
    errors = []
    for name in names:
        try:
            with torch.random.fork_rng(devices=[]):  # building must not shift the tests' random state
                scratch = Path(tempfile.mkdtemp(prefix=f"raw_examples_{name}_"))
                atexit.register(shutil.rmtree, scratch, ignore_errors=True)
                encoder = create_encoder(name, **get_encoder_info(name).tiny_kwargs(scratch))
        except Exception as err:  # e.g. an encoder whose tiny variant needs something missing here
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if type(encoder).example_inputs is not ModalityEncoder.example_inputs:
            return encoder
        errors.append(f"{name}: {type(encoder).__name__} does not define example_inputs")
    raise KeyError(f"no tiny {modality!r} encoder could be built for example inputs: {'; '.join(errors)}")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A smoke-size run of the digits recipe (seconds), trained once per test session."""
    from bind.recipe import load_recipe
    from bind.train.trainer import run_recipe

    if not (DATA_ROOT / "mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    out = tmp_path_factory.mktemp("run")
    run_recipe(load_recipe(DIGITS, [*SMOKE, f"data_root={DATA_ROOT}"]), out, show_progress=False)
    return out
