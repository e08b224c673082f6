"""The core names no modality and never imports the built-in encoders: they plug in as any plugin does.

Modalities, augmenters, shard decoders, prompts and trunk sharing are the encoders' business
(registered with ``register_encoder``, ``register_decoder``, or declared on the encoder class); a
recipe's loss is a registry name. These checks read ``bind/``'s source, so a modality name or an
``import encoders`` slipping into the core fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bind import list_modalities
from bind.registry import ENTRY_POINT_GROUP

BIND = Path(__file__).parents[1] / "bind"
# Benchmarks time concrete workloads (the digits recipe's towers, a ViT-B/16 and BERT-base pair, a DDP check on
# image and audio): naming the modalities of the workload they measure is their job. The core's modules may not.
WORKLOADS = BIND / "bench"
CORE = sorted(p for p in BIND.rglob("*.py") if WORKLOADS not in p.parents)
# words that are a modality's name but mean something else where they stand
NOT_A_MODALITY = {
    ("data/manifest.py", "text"): "a manifest column's kind: its cells hold the text itself, not paths",
    ("plot.py", "text"): "plotly's layout key for a title's text",
    ("serve/app.py", "text"): "the search form's field holding a query text (POST /search, beside 'file')",
}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may say "image")."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def modality_literals(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    prose = docstrings(tree)
    return [
        f"{path}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and id(node) not in prose and node.value in names
    ]


def test_the_core_names_no_modality():
    names = set(list_modalities())  # every registered one: the built-ins and the plugins the tests loaded
    assert {"image", "text", "audio", "video"} <= names
    found = [
        hit
        for path in CORE
        for hit in modality_literals(path, names - {w for (f, w) in NOT_A_MODALITY if path == BIND / f})
    ]
    assert not found, "modality names in bind/ code:\n" + "\n".join(found)


def test_the_check_finds_a_modality_name(tmp_path):
    """The check above can fail: a core module comparing against a modality name is caught."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text('"""Docstrings may say image."""\n\ndef f(m):\n    return m == "audio"\n')
    assert [hit.split(": ")[-1] for hit in modality_literals(sneaky, {"audio", "image"})] == ["'audio'"]


@pytest.mark.parametrize("path", CORE + sorted(WORKLOADS.rglob("*.py")), ids=lambda p: str(p.relative_to(BIND)))
def test_bind_never_imports_the_builtin_encoders(path):
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            modules = [arg.value] if isinstance(arg, ast.Constant) else []
        assert not [m for m in modules if m == "encoders" or m.startswith("encoders.")], f"{path}:{node.lineno}"


def test_builtin_encoders_register_through_the_entry_point():
    from importlib.metadata import entry_points

    own = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None and ep.dist.name == "bindkit"]
    assert [ep.value for ep in own] == ["encoders"]
