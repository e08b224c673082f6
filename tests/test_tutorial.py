"""docs/tutorial.md runs as written: one shell session pastes its commands and saves its files, in order."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

TUTORIAL = Path(__file__).parents[1] / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(\w+)(?: file=(\S+))?\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[str, str | None, str]]:
    return BLOCK.findall(TUTORIAL.read_text())


def as_script(parts: list[tuple[str, str | None, str]]) -> str:
    """The tutorial as a user performs it: bash blocks typed in, file blocks saved in the current folder."""
    lines = ["set -eo pipefail"]
    for kind, name, text in parts:
        if name:
            lines.append(f"cat > {shlex.quote(name)} <<'BINDKIT_TUTORIAL_EOF'\n{text}BINDKIT_TUTORIAL_EOF")
        elif kind == "bash":
            lines.append(text)
    return "\n".join(lines)


def test_the_encoder_file_is_about_thirty_lines():  # the tutorial's promise
    sources = {name: text for _, name, text in blocks() if name}
    assert set(sources) == {"make_data.py", "my_sensor.py", "heat.yaml", "search.py"}
    assert len(sources["my_sensor.py"].strip().splitlines()) <= 35


def test_the_tutorial_runs_as_written(tmp_path, data_root):
    repo = tmp_path / "bindkit"  # a checkout: the venv, and ../shared beside it
    repo.mkdir()
    (repo / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "shared").symlink_to(data_root.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("BINDKIT_DATA", "VIRTUAL_ENV")}
    done = subprocess.run(
        ["bash", "-c", as_script(blocks())], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    work = repo / "scratch" / "heat"
    results = json.loads((work / "runs" / "heat" / "eval.json").read_text())
    # a noisy 8 x 8 thumbnail still says which digit it is: the binding worked
    assert results["zero_shot"]["heat"]["accuracy"] > 0.6
    assert results["retrieval"]["heat->image"]["R@1"] > 0.6
    assert done.stdout.count("heat_cnn ") == 6 and "FAIL" not in done.stdout  # the contract checks passed
    assert "heat_data/eval1" in done.stdout  # bindkit retrieve listed gallery images
    assert "[[(" in done.stdout.splitlines()[-1]  # search.py printed (name, score) pairs
