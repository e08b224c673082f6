"""docs/tutorial.md runs as written: its files are written out, its commands run in a fresh folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

TUTORIAL = Path(__file__).parents[1] / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(\w+)(?: file=(\S+))?\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[str, str | None, str]]:
    return BLOCK.findall(TUTORIAL.read_text())


def test_the_encoder_file_is_about_thirty_lines():
    sources = {name: text for _, name, text in blocks() if name}
    assert set(sources) == {"make_data.py", "my_sensor.py", "heat.yaml", "search.py"}
    assert len(sources["my_sensor.py"].strip().splitlines()) <= 32


def test_the_tutorial_runs_as_written(tmp_path, data_root):
    env = {
        **os.environ,
        "BINDKIT_DATA": str(data_root),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # bindkit and python of this venv
    }
    outputs = []
    for kind, name, text in blocks():
        if name:
            (tmp_path / name).write_text(text)
        elif kind == "bash":
            for line in text.strip().splitlines():
                done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
                assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
                outputs.append(done.stdout)
    results = json.loads((tmp_path / "runs" / "heat" / "eval.json").read_text())
    # a noisy 8 x 8 thumbnail still says which digit it is: the binding worked
    assert results["zero_shot"]["heat"]["accuracy"] > 0.6
    assert results["retrieval"]["heat->image"]["R@1"] > 0.6
    assert "heat_data/eval1" in outputs[-2]  # bindkit retrieve listed gallery images
    assert "heat_data/eval" in outputs[-1] and "[[(" in outputs[-1]  # search.py printed (name, score) pairs
