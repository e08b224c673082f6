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
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .registry import check_encoder_kwargs, get_encoder_info, load_plugins

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
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append((arg, err))
        for arg, err in errors:  # a mapping meant for a dataclass: its own error (unknown key, bad type) says more
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
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
        return {k: _convert(v, args[1], _join(where, k)) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, where)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _type_error(value, tp, where)


def _join(where: str, key: object) -> str:
    """``recipes/x.yaml: stages[0]`` + ``epochs`` -> ``recipes/x.yaml: stages[0].epochs``."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


def _type_error(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields or key == "source" and cls is Recipe:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required key is missing (expected {_type_name(hints[name])})")
    return cls(**kwargs)


def set_override(data: dict[str, Any], dotted: str, source: str = "command line") -> None:
    """Apply ``key.sub=value`` (value parsed as YAML; list items by index: ``stages.0.epochs=2``)."""
    if "=" not in dotted:
        raise ConfigError(f"{source}: override {dotted!r} must look like key.sub=value")
    path, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
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


def parse_recipe(data: Any, source: str = "<recipe>", check_data: bool = True) -> Recipe:
    """Validate a recipe mapping; ``check_data=False`` skips the data paths (a run used on another machine)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping at top level, got {type(data).__name__}")
    recipe = _build(Recipe, data, f"{source}: ")
    recipe.source = source
    _check_semantics(recipe, check_data)
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for item in overrides:
        set_override(data, item)
    return parse_recipe(data, str(path))


def _check_semantics(r: Recipe, check_data: bool = True) -> None:
    """Cross-key checks: names that must exist elsewhere in the recipe or in the registry."""
    from .data import check_data_spec  # data imports recipe types; import here to keep the cycle out

    load_plugins(r.plugins)
    src = r.source
    if r.anchor_modality not in r.modalities:
        raise ConfigError(
            f"{src}: anchor_modality {r.anchor_modality!r} is not under modalities ({', '.join(r.modalities)})"
        )
    for m, spec in r.modalities.items():
        where = f"{src}: modalities.{m}"
        info = get_encoder_info(spec.encoder)  # unknown names raise with close matches
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
        if spec.lora is not None:  # target_modules are checked against the built tower (bind.lora.apply_lora)
            lora = spec.lora
            if lora.rank < 1:
                raise ConfigError(f"{where}.lora.rank: expected a positive integer, got {lora.rank}")
            if lora.alpha <= 0:
                raise ConfigError(f"{where}.lora.alpha: expected a positive number, got {lora.alpha}")
            if not 0 <= lora.dropout < 1:
                raise ConfigError(f"{where}.lora.dropout: expected a probability in [0, 1), got {lora.dropout}")
            if lora.target_modules is not None and not lora.target_modules:
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
        for key in ("train_data", "eval_data"):
            data_spec = getattr(spec, key)
            if data_spec is not None and check_data:
                check_data_spec(data_spec, r.data_root, _join(where, key))
    if not r.stages:
        raise ConfigError(f"{src}: stages: at least one stage is needed")
    for key in ("checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
        value = getattr(r, key)
        if value is not None and value < 1:
            raise ConfigError(f"{src}: {key}: expected a positive number, got {value}")
    if not 0 <= r.max_bad_fraction <= 1:
        raise ConfigError(f"{src}: max_bad_fraction: expected a share between 0 and 1, got {r.max_bad_fraction}")
    for i, stage in enumerate(r.stages):
        where = f"{src}: stages[{i}] ({stage.name})"
        if (stage.epochs is None) == (stage.steps is None):
            raise ConfigError(f"{where}: give exactly one of epochs or steps")
        if stage.log_every < 1:
            raise ConfigError(f"{where}.log_every: expected a positive number of steps, got {stage.log_every}")
        if stage.chunk_size is not None and stage.chunk_size < 1:
            raise ConfigError(
                f"{where}.chunk_size: expected a positive number of items (or null), got {stage.chunk_size}"
            )
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


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (written to the run directory as recipe.yaml)."""
    data = dataclasses.asdict(recipe)
    data.pop("source")
    return json.loads(json.dumps(data))  # tuples -> lists, so a safe YAML dumper can write it
