"""The command starts cheap: its parser and its argument checks import no torch, numpy or transformers.

No timing here (``bindkit bench startup`` times it): what is checked is which modules a fresh process imported,
which is what made ``bindkit --help`` take two seconds before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers")

# runs bindkit's main on argv in this process, then prints the heavy modules it imported (also when it exits)
PROBE = f"""
import sys
from bind.cli import main
try:
    main(sys.argv[1:])
finally:
    print("imported:", *sorted(m for m in {HEAVY!r} if m in sys.modules), flush=True)
"""


def probe(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``bindkit ARGV`` in a fresh process, and the heavy modules it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.startswith("imported:"))
    return done, line.split()[1:]


def test_building_the_parser_imports_no_heavy_module():
    code = (
        f"import sys, bind, bind.cli; bind.cli.build_parser(); print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"bind.cli imports {done.stdout.strip()} at module level"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["validate", "--help"], ["bench", "--help"]])
def test_help_and_version_import_no_heavy_module(argv):
    done, imported = probe(*argv)
    assert done.returncode == 0, done.stderr
    assert "bindkit" in done.stdout
    assert imported == []


def test_a_missing_input_list_is_one_line_before_torch_or_the_model_loads(tmp_path):
    model = tmp_path / "model"  # never read: the inputs are checked before the model is looked at
    missing = tmp_path / "queries.txt"
    done, imported = probe("embed", str(model), f"@{missing}", "--modality", "image", "--out", str(tmp_path / "e.npy"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"bindkit embed: error: {missing}: "), done.stderr
    assert "not found" in done.stderr
    assert imported == []


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("validate {tmp}/nope.yaml", "{tmp}/nope.yaml"),
        ("run recipes/digits.yaml stages.9.epochs=1", "recipes/digits.yaml: command line"),
        ("embed m x.png --modality image --out e.npy --device gpu", "--device"),
        (
            "retrieve m --query q --query-modality a --gallery-modality b --gallery-embeddings {tmp}/g.npy",
            "{tmp}/g.npy",
        ),
        ("eval m --data {tmp}/pairs.csv", "{tmp}/pairs.csv"),
        ("plot m --out {tmp}/s.png --data {tmp}/pairs.csv", "{tmp}/pairs.csv"),
        ("shard {tmp}/pairs.csv --out {tmp}/shards", "{tmp}/pairs.csv"),
    ],
    ids=["validate", "run", "embed-device", "retrieve", "eval", "plot", "shard"],
)
def test_a_bad_argument_or_input_file_is_one_line_before_torch_loads(command, named, tmp_path):
    argv = command.format(tmp=tmp_path).split()
    done, imported = probe(*argv)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"bindkit {argv[0]}: error: "), done.stderr
    assert named.format(tmp=tmp_path) in done.stderr
    assert imported == []


def test_the_check_names_of_the_parser_are_bind_testings():
    from bind.cli.check_encoder import CHECKS
    from bind.testing import CONTRACT_CHECKS

    assert CHECKS == CONTRACT_CHECKS


def test_transformers_is_quieted_when_it_loads_after_the_cli_started():
    """The CLI does not import transformers to quiet it: the environment quiets a later import (and its children)."""
    code = (
        "import logging, sys\nfrom bind.cli import _quiet_transformers\n_quiet_transformers(verbose=False)\n"
        "assert 'transformers' not in sys.modules\nfrom transformers.utils import logging as hf\n"
        "print(hf.is_progress_bar_enabled(), hf.get_verbosity() == logging.ERROR)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr


@pytest.mark.parametrize("name", ["auto", "cpu", "cpu:0", "cuda", "cuda:1"])
def test_every_device_torch_takes_here_passes_the_early_check(name):
    from bind.cli._inputs import check_device_name

    check_device_name(name)  # cpu:0 was refused by the early check while the recipe's device: took it
