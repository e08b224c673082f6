"""The recipe key reference: every key with its type, default and meaning, read from bind/recipe/schema.py.

The meaning of a field is the trailing ``# comment`` on its line in the recipe dataclasses, so the
dataclasses stay the one source of truth; :func:`recipe_reference` renders them as Markdown (what
``bindkit recipe-keys`` prints and docs/recipe-keys.md holds) and raises when a field has no comment
or a nested dataclass has no section.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Union

from . import DataSpec, EvalSpec, LoraSpec, ModalitySpec, OptimSpec, PairSpec, Recipe, StageSpec

REFRESH_COMMAND = "bindkit recipe-keys --out docs/recipe-keys.md"

# (dataclass, the paths where its keys sit in a recipe), in the order a reader meets them
SECTIONS: list[tuple[type, tuple[str, ...]]] = [
    (Recipe, ()),
    (ModalitySpec, ("modalities.<name>",)),
    (DataSpec, ("modalities.<name>.train_data", "modalities.<name>.eval_data", "eval.sets.<set>.<modality>")),
    (LoraSpec, ("modalities.<name>.lora",)),
    (StageSpec, ("stages[i]",)),
    (PairSpec, ("stages[i].pairs.<modality>",)),
    (OptimSpec, ("stages[i].optimizer",)),
    (EvalSpec, ("eval",)),
]
INTERNAL = {(Recipe, "source")}  # set by load_recipe, not a key a recipe writes


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the trailing ``# comment`` on its line(s) in the class source ('' when none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0].body
    return {
        node.target.id: " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments)
        for node in body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def documented_fields(cls: type) -> list[tuple[dataclasses.Field, Any, str]]:
    """(field, type, meaning) of each key of ``cls``; raises ValueError for a field without a meaning."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if (cls, f.name) in INTERNAL:
            continue
        if not docs.get(f.name):
            raise ValueError(
                f"{cls.__qualname__}.{f.name} has no meaning: add a trailing '# comment' on its line "
                f"({inspect.getsourcefile(cls)}), then run `{REFRESH_COMMAND}`"
            )
        out.append((f, hints[f.name], docs[f.name]))
    return out


def recipe_reference() -> str:
    """The Markdown reference of every recipe key (docs/recipe-keys.md)."""
    _check_sections()
    lines = [
        f"<!-- Generated from bind/recipe/schema.py by `{REFRESH_COMMAND}`; do not edit by hand. -->",
        "",
        "# Recipe keys",
        "",
        "Every key a recipe may set, with its type, default and meaning, generated from the dataclasses in "
        "bind/recipe/schema.py (`bindkit validate RECIPE` checks a file against them). `null` is YAML's null; "
        "a float key also takes an integer; `<name>` stands for a modality name.",
    ]
    for cls, paths in SECTIONS:
        title = " / ".join(f"`{p}`" for p in paths) or "Top level"
        lines += ["", f"## {title}", ""]
        doc = _class_doc(cls)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        prefix = paths[0] if paths else ""
        for f, tp, meaning in documented_fields(cls):
            path = f"{prefix}.{f.name}" if prefix else f.name
            cells = [f"`{f.name}`", _type_text(tp, path), _default_text(f, path), meaning]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---- rendering -----------------------------------------------------------------------------------
def _class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclasses write a signature when a class has no docstring
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _see(cls: type, path: str) -> str:
    """The section path of dataclass ``cls`` that belongs to the key at ``path``."""
    paths = _section_paths()[cls]
    return next((p for p in paths if p.startswith(path)), paths[0] if paths else "top level")


def _type_text(tp: Any, path: str) -> str:
    """A type as a reader says it: ``int or null``, ``'none' or 'trunk'``, ``list of str``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a, path) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"mapping (see `{_see(tp, path)}`)"
    if origin is dict:
        if args[1] is Any:
            return "mapping"
        value = _type_text(args[1], path)
        return f"mapping of {_type_text(args[0], path)} to {f'({value})' if ' or ' in value else value}"
    if origin is list:
        return f"list of {_type_text(args[0], path)}"
    if origin is tuple:
        return f"list [{', '.join(_type_text(a, path) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field, path: str) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"see `{_see(type(value), path)}`"
    return f"`{_yaml_text(value)}`"


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


# ---- completeness --------------------------------------------------------------------------------
@functools.cache
def _section_paths() -> dict[type, tuple[str, ...]]:
    return dict(SECTIONS)


def _check_sections() -> None:
    """Every dataclass a recipe can nest has a section, and every section is reachable from Recipe."""
    reachable = nested_dataclasses(Recipe)
    listed = set(_section_paths())
    if reachable != listed:
        missing = ", ".join(sorted(c.__name__ for c in reachable - listed))
        extra = ", ".join(sorted(c.__name__ for c in listed - reachable))
        raise ValueError(
            f"bind/recipe/keys.py SECTIONS is stale: missing {missing or '-'}; not in a recipe {extra or '-'}"
        )


def nested_dataclasses(cls: type = Recipe, seen: set[type] | None = None) -> set[type]:
    """``cls`` and every dataclass its fields hold, at any depth: the sections a recipe can have."""
    seen = set() if seen is None else seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        for inner in _walk_type(tp):
            if inner not in seen:
                nested_dataclasses(inner, seen)
    return seen


def _walk_type(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    if typing.get_origin(tp) is Literal:
        return []
    return [c for arg in typing.get_args(tp) for c in _walk_type(arg)]
