"""The built-in encoders are plugins like any other: they import from ``bind`` only what a third-party plugin may,
the top-level names of ``bind.__all__`` (``from bind import ModalityEncoder, register_encoder``), never a
submodule (``bind.registry``, ``bind.errors``, ...) whose insides may change between releases."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bind

ENCODERS = Path(__file__).resolve().parents[1] / "encoders"
PUBLIC = frozenset(bind.__all__)


def surface_violations(source: str, where: str = "<source>") -> list[str]:
    """``where:line: what`` for each import from ``bind`` that reaches past its public surface."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node, f"import {a.name}") for a in node.names if a.name.startswith("bind.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            if node.module.startswith("bind."):
                found.append((node, f"from {node.module} import ...: a submodule of bind"))
            elif node.module == "bind":
                found += [
                    (node, f"from bind import {a.name}: not in bind.__all__")
                    for a in node.names
                    if a.name not in PUBLIC
                ]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("bind."):
                found.append((node, f"import_module({arg.value!r})"))
    return [f"{where}:{node.lineno}: {what}" for node, what in found]


@pytest.mark.parametrize("path", sorted(ENCODERS.rglob("*.py")), ids=lambda p: str(p.relative_to(ENCODERS)))
def test_builtin_encoders_import_only_the_public_names_of_bind(path):
    assert surface_violations(path.read_text(), str(path)) == []


def test_every_encoder_module_is_checked():
    """The glob reaches into sub-packages (encoders/imagebind/), not only the top level."""
    checked = {str(p.relative_to(ENCODERS)) for p in ENCODERS.rglob("*.py")}
    assert {"image.py", "imagebind/__init__.py", "imagebind/factories.py"} <= checked


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("from bind import ModalityEncoder, register_encoder\n", []),
        ("import bind\n", []),
        ("from .image_io import load_image\n", []),
        ("from bindkit_extra import x\n", []),
        ("from bind.encoder import HeadKind\n", ["<source>:1: from bind.encoder import ...: a submodule of bind"]),
        ("from bind.errors import did_you_mean\n", ["<source>:1: from bind.errors import ...: a submodule of bind"]),
        ("import bind.registry\n", ["<source>:1: import bind.registry"]),
        ("import os\nimport bind.safe_io as s\n", ["<source>:2: import bind.safe_io"]),
        (
            "from bind import ConfigError, did_you_mean\n",
            ["<source>:1: from bind import did_you_mean: not in bind.__all__"],
        ),
        ("from bind import *\n", ["<source>:1: from bind import *: not in bind.__all__"]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bind.registry import FileArg\n",
            ["<source>:3: from bind.registry import ...: a submodule of bind"],
        ),
        (
            "import importlib\n\ndef f():\n    return importlib.import_module('bind.safe_io')\n",
            ["<source>:4: import_module('bind.safe_io')"],
        ),
    ],
)
def test_the_check_catches_an_import_past_the_surface(source, caught):
    assert surface_violations(source) == caught
