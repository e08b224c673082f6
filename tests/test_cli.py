"""The ``bindkit`` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def bindkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "bind", *args], capture_output=True, text=True, env=env, timeout=120)


def test_encoders_json_lists_name_and_modality():
    out = bindkit("encoders", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["digits_cnn"]["modality"] == "image"
    assert {r["modality"] for r in rows} >= {"image", "text", "audio", "video"}
    assert by_name["digits_cnn"]["parameters"] > 0


def test_encoders_table_with_a_plugin():
    out = bindkit("encoders", "--plugin", "imu_plugin", "--modality", "imu")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "MODALITY", "PARAMETERS", "PRETRAINED"]
    assert row.split()[:2] == ["imu_test_cnn", "imu"]


def test_a_bad_plugin_is_one_clear_line_without_traceback():
    out = bindkit("encoders", "--plugin", "not_a_module")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "plugin module 'not_a_module' could not be imported" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
