"""Typed YAML, read from files anyone may have written: the machinery under :mod:`bind.recipe`.

``read_recipe_file`` reads a bounded, text-only YAML mapping with no anchors or aliases;
``build`` checks a mapping against a dataclass (keys, types, finite numbers, value ranges) and
builds it; ``set_override`` applies ``key.sub=value`` from the command line. Each refusal is one
line that names the file and the key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


# ---- value ranges --------------------------------------------------------------------------------
class Range(typing.NamedTuple):
    """The numbers a key accepts, worded as an error says it: ``expected a positive integer, got 0``."""

    expected: str
    accepts: Callable[[float], bool]


POSITIVE_INT = Range("a positive integer", lambda v: v >= 1)
COUNT = Range("an integer >= 0", lambda v: v >= 0)
POSITIVE = Range("a positive number", lambda v: v > 0)
NON_NEGATIVE = Range("a number >= 0", lambda v: v >= 0)
SHARE = Range("a number between 0 and 1", lambda v: 0 <= v <= 1)
BELOW_ONE = Range("a number in [0, 1)", lambda v: 0 <= v < 1)

Ranges = dict[type, dict[str, Range]]  # dataclass -> number key -> the values it takes


def check_range(ranges: Ranges, cls: Any, name: str, value: Any, tp: Any, where: str) -> None:
    """Raise when ``value`` (or an item of it, for a pair like betas) is outside the range ``ranges`` gives the key."""
    limit = ranges.get(cls, {}).get(name)
    if limit is None or value is None:  # null passed the type check: the key allows it
        return
    items = [(f"{where}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(where, value)]
    for key, item in items:
        if not limit.accepts(item):
            or_null = " or null" if type(None) in typing.get_args(tp) else ""
            raise ConfigError(f"{key}: expected {limit.expected}{or_null}, got {_shown(item)}")


# ---- converting -------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return {dict: "a mapping", list: "a list", tuple: "a list"}.get(origin, str(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, where: str, ranges: Ranges) -> Any:
    """Check ``value`` against type ``tp`` and convert it (nested dataclasses, int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _plain(value, where)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, where, ranges)
            except ConfigError as err:
                errors.append((arg, err))
        # a mapping meant for a dataclass (unknown key, bad type), or a NaN: its own error says more
        for arg, err in errors:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict) or isinstance(err, _NotFinite):
                raise err
        raise _type_error(value, tp, where)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, where)
    if origin is Literal:
        if value in args:
            return value
        raise _type_error(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        return build(tp, value, where, ranges)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        for k in value:
            if not isinstance(k, str) or not k.isprintable() or not k:  # every recipe mapping is keyed by names
                raise ConfigError(f"{_join(where, k)}: expected a name (printable text) as key, got {_shown(k)}")
        return {k: _convert(v, args[1], _join(where, k), ranges) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, where)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_shown(value)}")
            return tuple(
                _convert(v, a, f"{where}[{i}]", ranges) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return [_convert(v, args[0], f"{where}[{i}]", ranges) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads 3e-4 (no dot) as a string
        except ValueError:
            raise _type_error(value, tp, where) from None
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):  # "nan", ".inf", 1e999: no step, rate or weight means that
            raise _NotFinite(f"{where}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str and isinstance(value, str) and not value.isprintable():  # names, paths: one line each
        raise ConfigError(
            f"{where}: expected printable text (no line breaks or control characters), got {_shown(value)}"
        )
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _type_error(value, tp, where)


class _NotFinite(ConfigError):
    """A NaN or infinite number: said as such even where the key also takes null."""


def _plain(value: Any, where: str) -> Any:
    """Free-form values (encoder and dataset args, augment knobs) are plain data: text, finite numbers, lists,
    mappings; no NaN, and none of the objects YAML tags make (!!binary bytes, !!set, dates)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotFinite(f"{where}: expected a finite number, got {_shown(value)}")
    if isinstance(value, dict):
        for k, v in value.items():
            _plain(v, _join(where, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float))):  # bool is an int
        raise ConfigError(
            f"{where}: expected text, a number, a list or a mapping, got {type(value).__name__} {_shown(value)}"
        )
    return value


def _join(where: str, key: object) -> str:
    """``recipes/x.yaml: stages[0]`` + ``epochs`` -> ``recipes/x.yaml: stages[0].epochs``."""
    shown = key if isinstance(key, str) and key.isprintable() and key else _shown(key)  # '' or a line break: quoted
    return f"{where}{shown}" if where.endswith(": ") else f"{where}.{shown}"


def _type_error(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {_shown(value)}")


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: an error quotes what it found, not 80 levels of it."""
    return _SHORT.repr(value)


def build(cls: Any, data: dict[str, Any], where: str, ranges: Ranges, hidden: frozenset[str] = frozenset()) -> Any:
    """``cls(**data)`` after checking every key, type and number range; each error names ``where`` and the key.

    ``ranges`` gives the numbers each dataclass's keys accept; ``hidden`` names fields no file may set."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields or key in hidden:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name), ranges)
            check_range(ranges, cls, name, kwargs[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing (expected {_type_name(hints[name])})")
    return cls(**kwargs)


# ---- reading YAML --------------------------------------------------------------------------------
MAX_RECIPE_BYTES = 1 << 20  # recipes are a few KB; a bigger file is not one, and pure-Python YAML would stall on it
MAX_NESTING = 50  # a recipe nests about 6 levels deep; this bounds the YAML composer's recursion


class _Refused(Exception):
    """What :class:`_RecipeLoader` will not read, with the line; the caller names the file."""


class _RecipeLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and deep nesting at the first event that has them.

    Each alias repeats what its anchor names, so ten lines of them (a "billion laughs") stand for 10**9
    items once anything walks the result. A recipe has no need for them; refusing them while parsing
    means nothing is ever expanded."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if event.anchor is not None:  # AliasEvent (*name) or a node with an anchor (&name)
            mark = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(
                f"line {line}: YAML anchor or alias {mark}{event.anchor}: a recipe may not use them; write the value "
                "out (PyYAML writes them for objects used twice: dump a copy, e.g. json.loads(json.dumps(data)))"
            )
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise _Refused(f"line {line}: nested more than {MAX_NESTING} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping, refused when a key appears twice in it (YAML would keep the last; a typo would lose the first)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key (a list): SafeLoader refuses it below
                continue
            if first is not None:
                raise _Refused(
                    f"line {line}: duplicate key {_shown(key)} (first on line {first}); each key once: delete one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> Any:
    """``text`` as plain YAML data, or a one-line ConfigError that starts with ``source``."""
    try:
        loader = _RecipeLoader(text)  # its reader refuses control characters here already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:  # its str() quotes the offending lines; one line says enough
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            f"{source}: not valid YAML: {at}{'; '.join(filter(None, [err.context, err.problem]))}"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from err


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML mapping in a recipe file, read as a file from anyone should be: bounded in size, text only,
    no anchors or aliases. Every refusal is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the recipe: {err.strerror}") from err
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RECIPE_BYTES >> 10} KiB; a recipe is a short YAML text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a text file (byte {err.start} is not UTF-8); a recipe is a YAML text file"
        ) from None
    control = yaml.reader.Reader.NON_PRINTABLE.search(text)  # what YAML refuses: NUL and other control bytes
    if control:
        line = text.count("\n", 0, control.start()) + 1
        raise ConfigError(
            f"{path}: not a text file (control character {control.group()!r} on line {line}); "
            "a recipe is a YAML text file"
        )
    data = _parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: holds no keys (empty, or only comments); {_RECIPE_IS}")
    return require_mapping(data, str(path))


_RECIPE_IS = "a recipe is a YAML mapping of keys (anchor_modality, modalities, stages, ...)"


def require_mapping(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {_RECIPE_IS} at top level, got {type(data).__name__}")
    return data


def set_override(data: dict[str, Any], dotted: str, source: str = "command line") -> None:
    """Apply ``key.sub=value`` (value parsed as YAML; list items by index: ``stages.0.epochs=2``)."""
    if "=" not in dotted:
        raise ConfigError(f"{source}: override {dotted!r} must look like key.sub=value")
    path, raw = dotted.split("=", 1)
    value = _parse_yaml(raw, f"{source}: override {path!r}") if raw else None
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
                raise ConfigError(f"{source}: override {path!r}: {'.'.join(keys[:i]) or 'recipe'} has no item {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"{source}: override {path!r}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
