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
    return subprocess.run(
        [sys.executable, "-m", "bind", *args], capture_output=True, text=True, env=env, timeout=120, cwd=TESTS.parent
    )


def test_encoders_json_lists_name_and_modality():
    out = bindkit("encoders", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["digits_cnn"]["modality"] == "image"
    assert {r["modality"] for r in rows} >= {"image", "text", "audio", "video"}
    assert by_name["digits_cnn"]["parameters"] > 0
    augmenters = {name: by_name[name]["augmenter"] for name in ("audio_cnn", "digits_cnn", "video_frames", "minilm")}
    assert augmenters == {
        "audio_cnn": "AudioAugment",
        "digits_cnn": "ImageAugment",
        "video_frames": "VideoAugment",
        "minilm": None,
    }


def test_losses_lists_the_builtin_losses_and_a_plugins(tmp_path):
    plugin = tmp_path / "zero_loss.py"
    plugin.write_text(
        "from bind import register_loss\n\n\n"
        '@register_loss("zero", kind="bind")\n'
        "def zero(z, anchor, labels, *, logit_scale, rows):\n"
        '    """Always 0: a loss a plugin registers."""\n'
        "    return (z * 0).sum()\n"
    )
    out = bindkit("losses", "--plugin", str(plugin), "--json")
    assert out.returncode == 0, out.stderr
    kinds = {row["name"]: row["kind"] for row in json.loads(out.stdout)}
    assert kinds == {
        "info_nce": "bind",
        "label_aware_info_nce": "bind",
        "supcon": "pretrain",
        "pairwise_cosine": "pretrain",
        "zero": "bind",
    }
    refused = bindkit("validate", "recipes/digits.yaml", "stages.0.loss=zero", "--plugin", str(plugin))
    assert refused.returncode == 2
    assert "stages[0] (image_specialist).loss: 'zero' is a bind loss; a pretrain stage takes" in refused.stderr


def test_encoders_table_with_a_plugin():
    out = bindkit("encoders", "--plugin", "imu_plugin", "--modality", "imu")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "MODALITY", "PARAMETERS", "PRETRAINED"]
    assert ["imu_test_cnn", "imu"] in [row.split()[:2] for row in rows]


def test_a_bad_plugin_is_one_clear_line_without_traceback():
    out = bindkit("encoders", "--plugin", "not_a_module")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "plugin module 'not_a_module' could not be imported" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2


def test_validate_accepts_the_digits_recipe_and_names_a_bad_key(tmp_path):
    from conftest import DATA_ROOT

    ok = bindkit("validate", "recipes/digits.yaml", f"data_root={DATA_ROOT}")
    assert ok.returncode == 0, ok.stderr
    assert "recipes/digits.yaml: ok" in ok.stdout
    bad = bindkit("validate", "recipes/digits.yaml", f"data_root={DATA_ROOT}", "stages.0.batch_size=big")
    assert bad.returncode == 2
    assert "recipes/digits.yaml: stages[0].batch_size: expected int, got 'big'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_missing_data_root_says_what_to_put_where(tmp_path):
    out = bindkit("validate", "recipes/digits.yaml", f"data_root={tmp_path}")
    assert out.returncode == 2
    assert f"{tmp_path}/mnist/images-idx3-ubyte.gz not found" in out.stderr
    assert "BINDKIT_DATA" in out.stderr


def test_every_option_has_help_and_no_docstring_markup():
    import argparse

    from bind.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "eval", "embed", "retrieve", "doctor"} <= set(sub.choices)
    for name, verb in sub.choices.items():
        text = verb.format_help()
        for markup in ("``", ":func:", ":class:", ":meth:"):
            assert markup not in text, f"bindkit {name} --help shows {markup!r}"
        for action in verb._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"bindkit {name}: {action.option_strings or action.dest} has no help line"
