"""``bindkit bench startup``: it runs each command and reports its figures (no timing asserts: timings live in
benchmarks, never in tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bind.errors import BindError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_one_run_of_each_command_reports_the_three_commands():
    from conftest import DATA_ROOT

    argv = ["bench", "startup", "repeats=1", f"data_root={DATA_ROOT}", "--json"]
    done = subprocess.run([sys.executable, "-m", "bind", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["repeats"] == 1
    assert list(result["commands"]) == ["version", "help", "validate"]
    assert result["commands"]["validate"].startswith("bindkit validate ")
    for name in ("version", "help", "validate"):
        for figure in ("median_s", "min_s"):
            seconds = result[f"{name}_{figure}"]
            assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0, (name, figure)


def test_a_failing_command_is_an_error_not_a_time(tmp_path):
    from bind.bench import run_benchmark

    with pytest.raises(BindError, match=r"`bindkit validate .*nope.yaml` failed \(exit 2\): .*not found"):
        run_benchmark("startup", repeats=1, recipe=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="repeats must be a positive number"):
        run_benchmark("startup", repeats=0)
