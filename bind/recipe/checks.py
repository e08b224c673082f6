"""The rules across a recipe's keys, checked after its types and ranges (:func:`bind.recipe.parse_recipe`).

Names that must exist elsewhere in the recipe (modalities, the anchor, pairs) or in a registry
(encoders and their arguments, losses, augmenters), combinations no stage could train with, and
what ``bindkit run`` will need from this machine: data paths, the weight files encoder arguments
name, hub weights in the cache when offline, optional packages, and that the towers' weights fit the
memory budget (:mod:`bind.budget`). Each refusal is one line naming the file and the key.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..budget import MemoryCheck, hub_offline, memory_budget
from ..data import check_data_spec
from ..data.augment import check_augment
from ..errors import ConfigError, DataError, UnknownEncoderError
from ..losses import LossKind, get_loss
from ..registry import EncoderInfo, check_encoder_kwargs, get_encoder_info, load_named_plugins
from .freeze import stage_modalities, tower_freeze
from .schema import ModalitySpec, Recipe, StageSpec

# recipe keys that need an optional package: key -> (importable module, the extra that installs it)
KEY_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard")}


def check_recipe(r: Recipe, check_data: bool = True, trust_plugins: bool = False) -> None:
    """Cross-key checks: names that must exist elsewhere in the recipe or in a registry.

    ``check_data``: also what this machine must hold for ``bindkit run`` (data, weight files, cached hub
    weights, packages, memory for the towers' weights); off for a saved run's recipe, whose model is rebuilt
    from its own folder.
    """
    src = r.source
    load_named_plugins(r.plugins, f"{src}: plugins", trust_plugins)
    if r.anchor_modality not in r.modalities:
        raise ConfigError(
            f"{src}: anchor_modality {r.anchor_modality!r} is not under modalities ({', '.join(r.modalities)})"
        )
    for m, spec in r.modalities.items():
        _check_modality(r, m, spec, check_data)
    if check_data:
        _check_memory(r)
    if r.eval.prompt_modality is not None and r.eval.prompt_modality not in r.modalities:
        raise ConfigError(
            f"{src}: eval.prompt_modality: expected one of {', '.join(r.modalities)} or null, got {r.eval.prompt_modality!r}"
        )
    for name, data in r.eval.sets.items():
        for m, spec in data.items():
            where = f"{src}: eval.sets.{name}.{m}"
            if m not in r.modalities:
                raise ConfigError(f"{where}: expected a modality of the recipe ({', '.join(r.modalities)}), got {m!r}")
            if spec.stream or spec.augment:
                raise ConfigError(f"{where}: evaluation reads by index, unaugmented; drop stream and augment there")
            if check_data:
                check_data_spec(spec, r.data_root, where)
    # no stages: the model is assembled (released towers as they are), saved and evaluated, nothing trains
    for i, stage in enumerate(r.stages):
        _check_stage(r, f"{src}: stages[{i}] ({stage.name})", stage)
    for key, (module, extra) in KEY_PACKAGES.items():
        if check_data and getattr(r, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{src}: {key}: true needs the {module} package: pip install -c constraints.txt -e '.[{extra}]'"
            )


def _check_modality(r: Recipe, m: str, spec: ModalitySpec, check_data: bool) -> None:
    """One entry under ``modalities``: its encoder and arguments, the modalities it names, its data."""
    where = f"{r.source}: modalities.{m}"
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
    for key in ("share_trunk_with", "init_from"):  # names of another modality of the recipe
        other = getattr(spec, key)
        if other is not None and (other not in r.modalities or other == m):
            others = ", ".join(x for x in r.modalities if x != m)
            raise ConfigError(f"{where}.{key}: expected another modality ({others}), got {other!r}")
    if spec.unfreeze_last_blocks and spec.freeze != "trunk":  # ModalityEncoder.freeze refuses it at run time
        raise ConfigError(f"{where}.unfreeze_last_blocks: applies with freeze: trunk only, got freeze {spec.freeze!r}")
    # target_modules are checked against the built tower (bind.lora.apply_lora)
    if spec.lora is not None and spec.lora.target_modules is not None and not spec.lora.target_modules:
        raise ConfigError(f"{where}.lora.target_modules: expected layer names, or null for the tower's default")
    if spec.eval_data is not None and spec.eval_data.stream:
        raise ConfigError(f"{where}.eval_data.stream: evaluation reads by index; drop stream there")
    if spec.train_data is not None and spec.train_data.stream and spec.train_data.source != "shards":
        raise ConfigError(f"{where}.train_data.stream: only source 'shards' streams, got {spec.train_data.source!r}")
    if spec.train_data is not None and spec.train_data.augment:
        check_augment(info, spec.train_data.augment, f"{where}.train_data.augment")
    if check_data:
        _check_encoder_needs(info, spec.args, where)
    for key in ("train_data", "eval_data"):
        data_spec = getattr(spec, key)
        if data_spec is not None and check_data:
            check_data_spec(data_spec, r.data_root, f"{where}.{key}")


def _check_encoder_needs(info: EncoderInfo, args: Mapping[str, Any], where: str) -> None:
    """What building the encoder will read from this machine, as its registration declares: the files its
    arguments name (``files``), and the rest (``check_args``: cached hub weights, packages, ...)."""
    for key, arg in info.files.items():
        value = args.get(key)
        if not isinstance(value, (str, os.PathLike)) or not arg.names_a_path(value):
            continue  # not given, or a name (an OpenCLIP weights tag) that check_args looks up
        path = Path(value).expanduser()
        if not (path.is_dir() if arg.folder else path.is_file()):
            state = f"is not a {'folder' if arg.folder else 'file'}" if path.exists() else "does not exist"
            raise DataError(f"{where}.args.{key}: {os.fspath(value)} {state}" + (f"; {arg.hint}" if arg.hint else ""))
    if info.check_args is not None:
        try:
            info.check_args(args)
        except (ConfigError, DataError) as err:  # its message starts with the key, relative to the entry
            raise type(err)(f"{where}.{err}") from None


def _check_memory(r: Recipe) -> None:
    """The towers fit the memory budget (:mod:`bind.budget`), counted on the meta device as ``bindkit run`` counts
    them before building (or as a count of the same tower found them before). Offline, so nothing is downloaded; a
    tower that fails to build there is left to the run, which raises its error with the key."""
    memory = MemoryCheck(memory_budget(r.device))
    with hub_offline():
        for m, spec in r.modalities.items():
            tower = f"modalities.{m}"
            argument_key = lambda arg, tower=tower: "embed_dim" if arg == "embed_dim" else f"{tower}.args.{arg}"  # noqa: E731
            args = {"embed_dim": r.embed_dim, **spec.args}
            memory.admit(spec.encoder, args, r.source, tower, argument_key, strict=False, remembered=True)


def _check_stage(r: Recipe, where: str, stage: StageSpec) -> None:
    """One stage: steps or epochs, the modalities and losses it names, their data, and that something trains."""
    src = r.source
    if (stage.epochs is None) == (stage.steps is None):
        raise ConfigError(f"{where}: give exactly one of epochs or steps")
    if stage.kind == "pretrain":
        if stage.modality not in r.modalities:
            raise ConfigError(f"{where}.modality: expected one of {', '.join(r.modalities)}, got {stage.modality!r}")
        _check_loss(stage.loss, "pretrain", f"{where}.loss")
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
            _check_loss(pair.loss, "bind", f"{where}.pairs.{m}.loss")
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
    in_stage = stage_modalities(r, stage)
    if all(tower_freeze(r, m, stage).part == "all" for m in in_stage):
        raise ConfigError(
            f"{where}: nothing would train: {', '.join(in_stage)} frozen 'all'; set freeze to 'trunk' or 'none' "
            "(under modalities, or this stage's freeze)"
        )


def _check_loss(name: str, kind: LossKind, where: str) -> None:
    try:
        get_loss(name, kind)  # registered by bind.losses or a plugin the recipe loaded above
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
