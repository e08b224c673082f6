"""Recipes: YAML files validated into typed dataclasses before anything trains.

A recipe names the modalities (encoder + arguments + what is frozen), the data, and the stages.
``load_recipe`` checks every key against the dataclasses below, every encoder name and its
arguments against the registry, and every data path; each error names the file, the key, what
was expected and what was found. The classes below never see the YAML: builders in the trainer
turn them into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, UnknownEncoderError
from .registry import check_encoder_kwargs, get_encoder_info, load_named_plugins

LossName = Literal["info_nce", "label_aware_info_nce", "supcon", "pairwise_cosine"]


@dataclass
class DataSpec:
    """Where a modality's items come from: a registered dataset builder and its arguments."""

    source: str  # dataset builder: mnist, fsdd, digit_captions, moving_digits, manifest, shards, or a plugin's
    split: str = "train"  # the builder's split (digit datasets: train or eval; manifest: its split column, '*': all)
    args: dict[str, Any] = field(default_factory=dict)  # builder keyword arguments
    augment: dict[str, Any] = field(default_factory=dict)  # augmentation knobs (training only; audio); {}: none
    stream: bool = False  # source shards: stream the tars (shuffle buffer, split over ranks and workers)
    shuffle_buffer: int = 1000  # stream: samples held for shuffling


@dataclass
class LoraSpec:
    """Low-rank adapters on the trunk (bind/lora.py): they and the head train, the trunk's weights do not."""

    rank: int = 8  # adapter rank: higher adapts more, trains more parameters (rank * (in + out) per layer)
    alpha: float = 16  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, training only
    target_modules: list[str] | None = None  # layer names or dotted endings; null: per tower (BERT: query, value)


@dataclass
class ModalitySpec:
    """One modality: its encoder, what of it trains, and its data."""

    encoder: str  # registry name, see `bindkit encoders`
    args: dict[str, Any] = field(default_factory=dict)  # factory keyword arguments (embed_dim comes from the recipe)
    freeze: Literal["none", "trunk", "all"] = "none"  # none: all trains; trunk: the head trains; all: nothing trains
    unfreeze_last_blocks: int = 0  # with freeze trunk: the trunk's last this many blocks train too
    lora: LoraSpec | None = None  # train LoRA adapters instead of the trunk (freeze none acts as trunk); null: no LoRA
    share_frame_encoder_with: str | None = None  # video: tie the frame encoder to this modality's encoder
    init_from: str | None = None  # start the trunk from this modality's trunk (e.g. image) when it first trains
    train_data: DataSpec | None = None  # training items; needed when a stage trains or pairs this modality
    eval_data: DataSpec | None = None  # evaluation items (zero-shot, retrieval); null: not evaluated


@dataclass
class OptimSpec:
    """AdamW with linear warmup, then cosine decay."""

    lr: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.05  # not applied to norms, biases, logit scales
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW beta1, beta2
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # clip the gradient norm to this; null: no clipping
    grad_accum_steps: int = 1  # batches whose gradients add up to one optimizer step


@dataclass
class PairSpec:
    """One (anchor, modality) pairing inside a binding stage."""

    weight: float = 1.0  # this pair's share of the step's loss
    loss: LossName = "label_aware_info_nce"  # info_nce or label_aware_info_nce (same-class items are no negatives)
    batch_size: int = 128  # pairs per step, over all processes
    pairing: Literal["label", "row"] = "label"  # label: any anchor item of the same class; row: manifest rows


@dataclass
class StageSpec:
    """One training stage; stages run in order, each with its own optimizer."""

    name: str  # names the stage in logs and metrics.jsonl
    kind: Literal["pretrain", "bind"]  # pretrain: one modality alone; bind: pair modalities with the frozen anchor
    modality: str | None = None  # pretrain: the specialist's modality
    loss: LossName = "supcon"  # pretrain loss: supcon or pairwise_cosine
    temperature: float = 0.1  # supcon temperature
    batch_size: int = 256  # pretrain batch size, over all processes
    pairs: dict[str, PairSpec] = field(default_factory=dict)  # bind: modality -> pairing with the anchor
    freeze: dict[str, Literal["none", "trunk", "all"]] = field(default_factory=dict)  # modality -> freeze, this stage
    epochs: float | None = None  # passes over the largest training set of the stage
    steps: int | None = None  # or a fixed number of optimizer steps
    optimizer: OptimSpec = field(default_factory=OptimSpec)  # this stage's optimizer and learning-rate schedule
    log_every: int = 20  # optimizer steps between lines in metrics.jsonl (and the last step)
    chunk_size: int | None = None  # GradCache: embed in chunks of this many items (memory of one chunk, +1 forward)
    local_loss: bool = False  # multi-process: score this rank's rows against the global batch (N/W x N logits)


@dataclass
class EvalSpec:
    """Evaluation after training (and by `bindkit eval`)."""

    prompt_modality: str = "text"  # zero-shot: class prototypes are the mean of this modality's eval items per class
    max_items: int | None = None  # cap per modality, for quick runs


@dataclass
class Recipe:
    """A whole recipe: the top-level keys of the YAML file."""

    anchor_modality: str  # the modality whose space the others bind to (frozen in bind stages)
    modalities: dict[str, ModalitySpec]  # modality name -> its encoder, freezing and data
    stages: list[StageSpec]  # training stages, run in order
    embed_dim: int = 128  # size of the shared embedding space (every encoder's output)
    seed: int = 0  # seeds Python, NumPy and torch, data order and augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if available, else CPU
    data_root: str | None = None  # default: $BINDKIT_DATA, else ../shared/data
    num_workers: int = 0  # DataLoader workers; 0 preprocesses in the main process
    plugins: list[str] = field(default_factory=list)  # modules that register encoders or datasets
    tensorboard: bool = False  # also log scalars to RUN_DIR/tensorboard (needs the tensorboard package)
    feature_cache: bool = True  # compute frozen, unaugmented trunks' features once per stage (false: every step)
    cache_dir: str | None = None  # keep those features on disk here (memory-mapped, reused across runs); null: RAM
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False  # CUDA conv towers: NHWC memory format (faster convolutions with bf16)
    compile: bool = False  # torch.compile each trainable tower (slower start, faster steps on GPU)
    checkpoint_every: int | None = 200  # optimizer steps between checkpoints (also at epoch ends); null: epochs only
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN_DIR/checkpoints
    on_bad_item: Literal["skip", "fail"] = "skip"  # skip: a corrupt item is replaced by the next one and counted
    max_bad_fraction: float = 0.01  # stop when more than this share of a training set is bad
    max_nonfinite_steps: int = 5  # NaN/inf losses are skipped; this many in a row stop the run
    eval: EvalSpec = field(default_factory=EvalSpec)  # evaluation settings
    source: str = "<recipe>"  # where it was loaded from (set by load_recipe)


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

# Every number key and the values it takes, in one place: `_build` checks each as it reads it (floats are
# already finite then: `_convert` refuses NaN and inf everywhere). tests/test_recipe_values.py fails on a
# number key missing here. Rules across keys (epochs or steps, a positive pair weight) are `_check_semantics`'.
RANGES: dict[type, dict[str, Range]] = {
    Recipe: {
        "embed_dim": POSITIVE_INT,
        "seed": Range("an integer in [0, 2**32) (NumPy's seed range)", lambda v: 0 <= v < 2**32),
        "num_workers": COUNT,
        "checkpoint_every": POSITIVE_INT,
        "keep_checkpoints": POSITIVE_INT,
        "max_bad_fraction": SHARE,
        "max_nonfinite_steps": POSITIVE_INT,
    },
    DataSpec: {"shuffle_buffer": POSITIVE_INT},
    LoraSpec: {"rank": POSITIVE_INT, "alpha": POSITIVE, "dropout": Range("a probability in [0, 1)", BELOW_ONE.accepts)},
    ModalitySpec: {"unfreeze_last_blocks": COUNT},
    OptimSpec: {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": BELOW_ONE,  # each of the two
        "warmup_steps": COUNT,
        "min_lr_ratio": SHARE,
        "grad_clip": POSITIVE,
        "grad_accum_steps": POSITIVE_INT,
    },
    PairSpec: {"weight": NON_NEGATIVE, "batch_size": POSITIVE_INT},
    StageSpec: {
        "temperature": POSITIVE,
        "batch_size": POSITIVE_INT,
        "epochs": POSITIVE,
        "steps": POSITIVE_INT,
        "log_every": POSITIVE_INT,
        "chunk_size": POSITIVE_INT,
    },
    EvalSpec: {"max_items": POSITIVE_INT},
}


def _check_range(cls: Any, name: str, value: Any, tp: Any, where: str) -> None:
    """Raise when ``value`` (or an item of it, for a pair like betas) is outside the range RANGES gives the key."""
    limit = RANGES.get(cls, {}).get(name)
    if limit is None or value is None:  # null passed the type check: the key allows it
        return
    items = [(f"{where}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(where, value)]
    for key, item in items:
        if not limit.accepts(item):
            or_null = " or null" if type(None) in typing.get_args(tp) else ""
            raise ConfigError(f"{key}: expected {limit.expected}{or_null}, got {_shown(item)}")


# ---- parsing -------------------------------------------------------------------------------------
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


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (nested dataclasses, int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _plain(value, where)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, where)
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
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        for k in value:
            if not isinstance(k, str) or not k.isprintable() or not k:  # every recipe mapping is keyed by names
                raise ConfigError(f"{_join(where, k)}: expected a name (printable text) as key, got {_shown(k)}")
        return {k: _convert(v, args[1], _join(where, k)) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, where)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_shown(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
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


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields or key == "source" and cls is Recipe:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
            _check_range(cls, name, kwargs[name], hints[name], _join(where, name))
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
    return _require_mapping(data, str(path))


_RECIPE_IS = "a recipe is a YAML mapping of keys (anchor_modality, modalities, stages, ...)"


def _require_mapping(data: Any, source: str) -> dict[str, Any]:
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


def parse_recipe(data: Any, source: str = "<recipe>", check_data: bool = True, trust_plugins: bool = False) -> Recipe:
    """Validate a recipe mapping; ``check_data=False`` skips the data paths (a run used on another machine).

    The recipe's ``plugins`` are imported only with ``trust_plugins`` or when already loaded
    (:func:`bind.registry.load_named_plugins`): a recipe may come from anyone."""
    recipe = _build(Recipe, _require_mapping(data, source), f"{source}: ")
    recipe.source = source
    _check_semantics(recipe, check_data, trust_plugins)
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: list[str] = (), trust_plugins: bool = False) -> Recipe:
    """Read, override and validate a recipe file (``trust_plugins``: import the modules its ``plugins`` name)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    data = read_recipe_file(path)
    for item in overrides:
        set_override(data, item, f"{path}: command line")
    return parse_recipe(data, str(path), trust_plugins=trust_plugins)


def _check_semantics(r: Recipe, check_data: bool = True, trust_plugins: bool = False) -> None:
    """Cross-key checks: names that must exist elsewhere in the recipe or in the registry."""
    from .data import check_data_spec  # data imports recipe types; import here to keep the cycle out

    src = r.source
    load_named_plugins(r.plugins, f"{src}: plugins", trust_plugins)
    if r.anchor_modality not in r.modalities:
        raise ConfigError(
            f"{src}: anchor_modality {r.anchor_modality!r} is not under modalities ({', '.join(r.modalities)})"
        )
    for m, spec in r.modalities.items():
        where = f"{src}: modalities.{m}"
        try:
            info = get_encoder_info(spec.encoder)  # unknown names raise with close matches
        except UnknownEncoderError as err:
            raise UnknownEncoderError(f"{where}.encoder: {err}", err.name) from None
        if info.modality != m:
            raise ConfigError(f"{where}.encoder: {spec.encoder!r} is a {info.modality!r} encoder, not {m!r}")
        if "embed_dim" in spec.args:
            raise ConfigError(f"{where}.args.embed_dim: set the top-level embed_dim instead (one space, one size)")
        try:
            check_encoder_kwargs(spec.encoder, {**spec.args, "embed_dim": r.embed_dim})
        except ConfigError as err:
            raise ConfigError(f"{where}.args: {err}") from None
        if spec.share_frame_encoder_with and spec.share_frame_encoder_with not in r.modalities:
            raise ConfigError(f"{where}.share_frame_encoder_with: no modality {spec.share_frame_encoder_with!r}")
        if spec.unfreeze_last_blocks and spec.freeze != "trunk":  # ModalityEncoder.freeze refuses it at run time
            raise ConfigError(
                f"{where}.unfreeze_last_blocks: applies with freeze: trunk only, got freeze {spec.freeze!r}"
            )
        # target_modules are checked against the built tower (bind.lora.apply_lora)
        if spec.lora is not None and spec.lora.target_modules is not None and not spec.lora.target_modules:
            raise ConfigError(f"{where}.lora.target_modules: expected layer names, or null for the tower's default")
        if spec.init_from is not None and (spec.init_from not in r.modalities or spec.init_from == m):
            others = ", ".join(x for x in r.modalities if x != m)
            raise ConfigError(f"{where}.init_from: expected another modality ({others}), got {spec.init_from!r}")
        if spec.eval_data is not None and spec.eval_data.stream:
            raise ConfigError(f"{where}.eval_data.stream: evaluation reads by index; drop stream there")
        if spec.train_data is not None and spec.train_data.stream and spec.train_data.source != "shards":
            raise ConfigError(
                f"{where}.train_data.stream: only source 'shards' streams, got {spec.train_data.source!r}"
            )
        if spec.train_data is not None and spec.train_data.augment:
            _check_augment(m, spec.train_data.augment, f"{where}.train_data.augment")
        for key in ("train_data", "eval_data"):
            data_spec = getattr(spec, key)
            if data_spec is not None and check_data:
                check_data_spec(data_spec, r.data_root, _join(where, key))
    if not r.stages:
        raise ConfigError(f"{src}: stages: at least one stage is needed")
    for i, stage in enumerate(r.stages):
        where = f"{src}: stages[{i}] ({stage.name})"
        if (stage.epochs is None) == (stage.steps is None):
            raise ConfigError(f"{where}: give exactly one of epochs or steps")
        if stage.kind == "pretrain":
            if stage.modality not in r.modalities:
                raise ConfigError(
                    f"{where}.modality: expected one of {', '.join(r.modalities)}, got {stage.modality!r}"
                )
            if stage.loss not in ("supcon", "pairwise_cosine"):
                raise ConfigError(
                    f"{where}.loss: a pretrain stage uses 'supcon' or 'pairwise_cosine', got {stage.loss!r}"
                )
            if r.modalities[stage.modality].train_data is None:
                raise ConfigError(f"{src}: modalities.{stage.modality}.train_data is needed by stage {stage.name!r}")
        else:
            if not stage.pairs:
                raise ConfigError(f"{where}.pairs: a bind stage needs at least one modality to pair with the anchor")
            if not any(pair.weight > 0 for pair in stage.pairs.values()):
                weights = ", ".join(f"{m}: {pair.weight}" for m, pair in stage.pairs.items())
                raise ConfigError(f"{where}.pairs: expected at least one positive weight, got {weights}")
            for m, pair in stage.pairs.items():
                if m not in r.modalities or m == r.anchor_modality:
                    others = [x for x in r.modalities if x != r.anchor_modality]
                    raise ConfigError(f"{where}.pairs.{m}: expected one of {', '.join(others)}")
                if pair.loss not in ("info_nce", "label_aware_info_nce"):
                    raise ConfigError(f"{where}.pairs.{m}.loss: expected 'info_nce' or 'label_aware_info_nce'")
                for needed in (m, r.anchor_modality):
                    if r.modalities[needed].train_data is None:
                        raise ConfigError(f"{src}: modalities.{needed}.train_data is needed by stage {stage.name!r}")
                data, anchor_data = r.modalities[m].train_data, r.modalities[r.anchor_modality].train_data
                if data.stream and (
                    pair.pairing != "row"
                    or anchor_data.source != "shards"
                    or anchor_data.args.get("path") != data.args.get("path")
                ):
                    raise ConfigError(
                        f"{where}.pairs.{m}: streamed shards pair by row with the anchor's column of the same shards: "
                        f"set pairing: row and the anchor's train_data to source: shards with path {data.args.get('path')!r}"
                    )
        for m in stage.freeze:
            if m not in r.modalities:
                raise ConfigError(f"{where}.freeze.{m}: no such modality")
        # as bind.stage.StageRunner freezes: the stage's freeze, else the modality's; a bind stage's anchor is frozen
        anchor = r.anchor_modality if stage.kind == "bind" else None
        in_stage = [stage.modality] if stage.kind == "pretrain" else [anchor, *stage.pairs]
        if all(stage.freeze.get(m, "all" if m == anchor else r.modalities[m].freeze) == "all" for m in in_stage):
            raise ConfigError(
                f"{where}: nothing would train: {', '.join(in_stage)} frozen 'all'; set freeze to 'trunk' or 'none' "
                "(under modalities, or this stage's freeze)"
            )


def _check_augment(modality: str, knobs: dict[str, Any], where: str) -> None:
    """The augmenter of ``modality`` exists and takes these knobs, of these types (bind/data/augment.py)."""
    from .data.augment import AUGMENTERS  # imported here as .data is: it imports the recipe types

    if modality not in AUGMENTERS:
        raise ConfigError(
            f"{where}: no augmentation is defined for modality {modality!r} (known: {', '.join(AUGMENTERS)})"
        )
    augmenter = AUGMENTERS[modality]
    if dataclasses.is_dataclass(augmenter):  # a plugin's may be any callable: then its own call checks at run time
        _build(augmenter, knobs, where)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (written to the run directory as recipe.yaml)."""
    data = dataclasses.asdict(recipe)
    data.pop("source")
    return json.loads(json.dumps(data))  # tuples -> lists, so a safe YAML dumper can write it
