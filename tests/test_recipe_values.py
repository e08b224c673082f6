"""Recipe values: every number key has a declared range, and no recipe or override, however mangled, gets past
``load_recipe`` as anything but a one-line BindError that names the file (a property-based fuzz)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bind.errors import BindError, ConfigError
from bind.recipe import RANGES, Recipe, load_recipe, parse_recipe
from bind.recipe.keys import nested_dataclasses

TESTS = Path(__file__).parent
DIGITS = TESTS.parent / "recipes" / "digits.yaml"
SECONDS_PER_RECIPE = 10  # a recipe loads in ~10 ms; anything near this is a hang, whatever the machine


# ---- every number key has a range ----------------------------------------------------------------------------
def is_number_type(tp: Any) -> bool:
    """int, float, their optional forms, and tuples of them (betas)."""
    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is tuple:
        return all(is_number_type(a) for a in args)
    return origin is not None and origin is not typing.Literal and len(args) == 1 and is_number_type(args[0])


def test_every_number_key_has_a_range_and_its_default_lies_in_it():
    classes = nested_dataclasses()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source" or not is_number_type(hints[f.name]):
                continue
            limit = RANGES.get(cls, {}).get(f.name)
            assert limit is not None, f"{cls.__name__}.{f.name}: declare its range in RANGES (bind/recipe/schema.py)"
            default = f.default if f.default is not dataclasses.MISSING else None
            for value in default if isinstance(default, tuple) else [default]:
                assert value is None or limit.accepts(value), f"{cls.__name__}.{f.name}: default {value} out of range"
    for cls, limits in RANGES.items():  # no stale entries
        assert cls in classes and set(limits) <= {f.name for f in dataclasses.fields(cls)}, cls


def test_a_range_says_what_it_accepts():
    ranges = RANGES[Recipe]
    assert ranges["embed_dim"].accepts(1) and not ranges["embed_dim"].accepts(0)
    assert ranges["seed"].accepts(2**32 - 1) and not ranges["seed"].accepts(2**32) and not ranges["seed"].accepts(-1)
    assert ranges["max_bad_fraction"].accepts(0) and ranges["max_bad_fraction"].accepts(1)
    assert not ranges["max_bad_fraction"].accepts(1.01)


def test_eval_tta_takes_1_to_16_views_and_refuses_the_values_around_them():
    """A recipe's eval.tta: 1 (off) through 16 views are read as given; 0, 17 and far above are one ConfigError
    naming the file, the key, the range and the value."""

    def with_tta(value: Any) -> dict[str, Any]:
        data = yaml.safe_load(DIGITS.read_text())
        data["eval"]["tta"] = value
        return data

    for value in (1, 2, 16):
        assert parse_recipe(with_tta(value), "digits.yaml", check_data=False).eval.tta == value
    for value in (0, -1, 17, 100):
        with pytest.raises(
            ConfigError, match=rf"^digits\.yaml: eval\.tta: expected an integer in 1\.\.16, got {value}$"
        ):
            parse_recipe(with_tta(value), "digits.yaml", check_data=False)


# ---- the fuzz ----------------------------------------------------------------------------------------------
def base_recipe(data_root: Path) -> dict[str, Any]:
    data = yaml.safe_load(DIGITS.read_text())
    data["data_root"] = str(data_root)
    return data


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a document, interior nodes included: ('stages', 2, 'pairs', 'audio', 'weight')."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out = []
    for key, value in children:
        out.append((*prefix, key))
        out += key_paths(value, (*prefix, key))
    return out


def nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


DELETE = object()
NASTY = [0, -1, -5, 1, 2**31, 2**32, 2**64, 10**400, 0.0, -0.0, -0.5, 0.5, 1.0, 1.5, 1e308]
NASTY += [math.nan, math.inf, -math.inf, "", "nan", "inf", "-1", "1e-3", "1e999", "~", "x", True, False, None]
NASTY += [[], {}, [1, 2], [0.9, 1.0], {"a": 1}, datetime.date(2020, 1, 1), b"\x00\x89PNG"]
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(st.integers(), st.floats(), text, st.booleans(), st.none())
values = st.one_of(
    st.sampled_from(NASTY),  # listed twice: a range's edges are where the mistakes are
    st.sampled_from(NASTY),
    scalars,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text | st.integers(), inner, max_size=3),
        max_leaves=8,
    ),
    st.integers(1, 80).map(nested),
)


def inline(value: Any) -> str:
    """An override's right-hand side: YAML flow text (or JSON, also YAML) for ``value``."""
    with contextlib.suppress(TypeError, ValueError):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


@st.composite
def recipe_files(draw, base: dict[str, Any]) -> tuple[bytes, list[str]]:
    """(file content, override strings): the digits recipe with values at random key paths mangled, or
    bytes that are no recipe at all."""
    paths = key_paths(base)
    numbers = [p for p in paths if type(_get(base, p)) in (int, float)]  # half the mutations: a number's range
    mappings = [()] + [p for p in paths if isinstance(_get(base, p), dict)]
    document = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.integers(0, 4)):
            path, value = draw(st.sampled_from(numbers) | st.sampled_from(paths)), draw(values | st.just(DELETE))
        else:  # a key the dataclasses do not know, anywhere a mapping is
            path, value = (*draw(st.sampled_from(mappings)), draw(text | st.integers())), draw(values)
        _set(document, path, value)
    content = yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode()
    kind = draw(st.sampled_from(["document"] * 6 + ["spliced", "bytes", "special"]))
    if kind == "spliced":  # YAML made invalid at a random place
        cut = draw(st.integers(0, len(content)))
        content = content[:cut] + draw(text).encode() + draw(st.binary(max_size=8)) + content[cut:]
    elif kind == "bytes":
        content = draw(st.binary(max_size=64))
    elif kind == "special":
        content = draw(st.sampled_from(SPECIAL_FILES))
    dotted = [".".join(map(str, p)) for p in paths] + ["", "nope", "stages.9.steps", "embed_dim.x", "stages.-1"]
    assignment = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(dotted), text | values.map(inline))
    override = st.one_of(assignment, assignment, assignment, text)
    return content, draw(st.lists(override, max_size=2))


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(document: Any, path: tuple, value: Any) -> None:
    try:
        parent = _get(document, path[:-1])
        if value is DELETE:
            del parent[path[-1]]
        elif isinstance(parent, (dict, list)):
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):  # an earlier mutation replaced or removed the parent
        pass


BOMB = b'augment:\n  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + b"".join(
    f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n".encode() for i in range(9)
)
SPECIAL_FILES = [
    b"",
    b"# only a comment\n",
    b"~\n",
    b"- a list\n",
    b"just text",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "embed_dim: 16\n".encode("utf-16"),
    b"a: 1\x00\n",
    BOMB,
    b"[" * 5000,
    b"a:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 300)),
    b"a: 1\n---\nb: 2\n",
    b"a: !!python/object:os.system ls\n",
    b"a: !!binary AAAA\n",
    b"? [a, b]\n: 1\n",
]


def refusal_kind(message: str) -> str:
    """What a refusal is about, from its message after the file name."""
    if message.startswith(": command line"):
        return "override"
    if message.startswith((": not", ": line", ": holds", ": a recipe", ": larger")):
        return "file"
    return "key"


@contextlib.contextmanager
def watchdog(seconds: float):
    """Fail, rather than hang, when the body runs past ``seconds`` (SIGALRM: Unix, main thread)."""

    def expire(signum, frame):
        raise TimeoutError(f"load_recipe ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_no_recipe_or_override_gets_past_load_recipe_as_anything_but_a_one_line_error_naming_the_file(
    data_root, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "recipe.yaml"
    refused: dict[str, tuple[bytes, list[str]]] = {}  # kind of refusal -> its first example
    outcomes = {"ok": 0, "refused": 0}

    @settings(
        max_examples=250,
        derandomize=True,  # the same examples on every run: CI stays deterministic
        database=None,
        deadline=datetime.timedelta(seconds=SECONDS_PER_RECIPE),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(recipe_files(base_recipe(data_root)))
    def check(example: tuple[bytes, list[str]]) -> None:
        content, overrides = example
        path.write_bytes(content)
        start = time.monotonic()
        try:
            with watchdog(SECONDS_PER_RECIPE):
                load_recipe(path, overrides)
            outcomes["ok"] += 1
        except BindError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, message
            outcomes["refused"] += 1
            if all(o and o[0] != "-" and "\x00" not in o for o in overrides):  # all can be a command's arguments
                refused.setdefault(refusal_kind(message.split(str(path), 1)[1]), (content, overrides))
        assert time.monotonic() - start < SECONDS_PER_RECIPE

    check()
    assert outcomes["ok"] > 10 and outcomes["refused"] > 100, outcomes  # the fuzz reaches both sides

    # one refusal of each kind, as a user meets it: the real CLI, in processes of its own (~5 s each to start)
    assert set(refused) == {"file", "key", "override"}, refused
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    processes = []
    for i, (content, overrides) in enumerate(refused.values()):
        (folder / f"bad{i}.yaml").write_bytes(content)
        command = [sys.executable, "-m", "bind", "validate", str(folder / f"bad{i}.yaml"), *overrides]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert "bindkit validate: error:" in stderr and str(folder / "bad") in stderr, stderr
