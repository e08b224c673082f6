"""The package's layers: every import in bind/ goes down (or sideways) a layer, and no two modules import each other.

The imports are read with ``ast`` from the files, deferred ones (inside functions) included: an import moved into a
function to dodge a cycle is still a cycle. ``if TYPE_CHECKING:`` blocks are left out (they never run), and
``from bind import X`` is followed to the module that defines X (bind/__init__.py's lazy exports).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bind

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and those below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("bind.errors",)),
    ("support", ("bind.safe_io", "bind.inputs", "bind.typed_yaml", "bind.distributed")),
    ("contract", ("bind.encoder", "bind.losses")),
    ("registries", ("bind.registry", "bind.budget", "bind.model_files")),
    ("data", ("bind.data",)),
    ("configuration", ("bind.recipe",)),
    ("model", ("bind.model", "bind.hub", "bind.lora")),
    (
        "using a model",
        ("bind.runs", "bind.evaluate", "bind.retrieval", "bind.ann", "bind.corpus", "bind.plot", "bind.testing"),
    ),
    ("serving", ("bind.serve",)),
    ("training", ("bind.train",)),
    ("commands", ("bind.cli", "bind.bench", "bind.__main__")),
]


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _type_checking_only(node: ast.AST) -> list[ast.stmt]:
    """The statements of an ``if TYPE_CHECKING:`` body (never run); its ``else`` runs and is read."""
    if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
        return node.body
    return []


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` imports, anywhere in the file but under ``if TYPE_CHECKING``."""
    tree = ast.parse(source)
    skipped = {id(n) for block in ast.walk(tree) for stmt in _type_checking_only(block) for n in ast.walk(stmt)}
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            targets = [base]
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    targets.append(f"{base}.{alias.name}")  # `from pkg import submodule`
                elif base == "bind" and alias.name in bind._EXPORTS:
                    targets.append(bind._EXPORTS[alias.name])  # a lazy export: its defining module
        elif isinstance(node, ast.Call) and _imported_by_name(node):
            targets = [node.args[0].value]  # importlib.import_module("bind.x") / __import__("bind.x")
        else:
            continue
        found.update(t for t in targets if t in known and t not in ("bind", module))
    return found


def _imported_by_name(call: ast.Call) -> bool:
    name = ast.unparse(call.func)
    return (
        name in ("importlib.import_module", "import_module", "__import__")
        and bool(call.args)
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    )


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted((root / "bind").rglob("*.py"))}
    known = {name for name, _ in files}
    return {name: imports_of(path.read_text(), name, pkg, known) for (name, pkg), path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(module) is not None and layer_of(target) is not None and layer_of(target) > layer_of(module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if m != "bind" and layer_of(m) is None)
    assert not unplaced, f"put these modules in a layer of tests/test_layers.py LAYERS: {unplaced}"


def test_imports_go_down_the_layers():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_module_imports_itself_back():
    assert not cycles(GRAPH), cycles(GRAPH)


def test_the_checks_catch_an_upward_import_and_a_hidden_cycle():
    deferred_up = "def f():\n    from ..train.trainer import run_recipe\n"
    known = {"bind.recipe.checks", "bind.train.trainer", "bind.recipe.schema"}
    graph = {"bind.recipe.checks": imports_of(deferred_up, "bind.recipe.checks", False, known)}
    assert upward_imports(graph) == ["bind.recipe.checks (configuration) imports bind.train.trainer (training)"], (
        "a deferred import is still an import"
    )
    back = imports_of("def g():\n    from . import checks\n", "bind.recipe.schema", False, known)
    assert cycles({"bind.recipe.schema": back, "bind.recipe.checks": {"bind.recipe.schema"}}) == [
        ["bind.recipe.checks", "bind.recipe.schema"]
    ]
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..train.trainer import run_recipe\n"
    assert not imports_of(typing_only, "bind.recipe.checks", False, known)
    by_name = "def h():\n    import importlib\n    return importlib.import_module('bind.train.trainer')\n"
    assert imports_of(by_name, "bind.recipe.checks", False, known) == {"bind.train.trainer"}
    runs_anyway = "if not TYPE_CHECKING:\n    from ..train import trainer\n"
    assert imports_of(runs_anyway, "bind.recipe.checks", False, known) == {"bind.train.trainer"}
    lazy_export = "from bind import run_recipe\n"
    assert imports_of(lazy_export, "bind.recipe.checks", False, known) == {"bind.train.trainer"}


def test_the_public_names_resolve_to_what_their_modules_define():
    assert bind.__all__ == sorted(bind._EXPORTS)
    for name, module in bind._EXPORTS.items():
        assert getattr(bind, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'BindModle'"):
        bind.BindModle  # noqa: B018


def test_the_users_import_is_one_line():
    code = "from bind import BindModel, load_recipe, run_recipe, load_run, SearchIndex; print(BindModel.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "BindModel"
