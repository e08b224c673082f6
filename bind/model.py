"""``BindModel``: one encoder per modality, all projecting into one space anchored on one modality.

A saved model is a directory with ``model.safetensors`` (weights) and ``config.json`` (each
encoder's registry name and arguments), plus ``assets/<modality>/`` for encoders that need files
besides weights (tokenizers, HF configs). Loading rebuilds every encoder from the registry; no
pickle is involved anywhere.

Example::

    model = BindModel({"image": create_encoder("digits_cnn"), "audio": create_encoder("audio_cnn")},
                      anchor_modality="image")
    model.save_pretrained("runs/demo")
    model = BindModel.from_pretrained("runs/demo")     # also a run directory written by `bindkit run`
    z = model.encode("audio", ["seven.wav"])           # numpy (1, D), unit-norm rows
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .encoder import ModalityEncoder
from .errors import ConfigError, DataError, UnknownEncoderError, did_you_mean
from .lora import ADAPTER_DIR, apply_lora_from_config, lora_config, save_adapter
from .registry import create_encoder, get_encoder_info, list_encoders, load_plugins

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class BindModel(nn.Module):
    """Encoders keyed by modality name, sharing ``embed_dim``, with one anchor modality."""

    def __init__(self, encoders: Mapping[str, ModalityEncoder], anchor_modality: str) -> None:
        super().__init__()
        if anchor_modality not in encoders:
            raise ConfigError(
                f"anchor_modality {anchor_modality!r} has no encoder; modalities present: {', '.join(encoders)}"
            )
        dims = {m: e.embed_dim for m, e in encoders.items()}
        if len(set(dims.values())) != 1:
            raise ConfigError(
                f"all encoders must share one embed_dim to live in one space; got {dims}. Build every encoder "
                "with the same embed_dim (a recipe sets it once, with the top-level embed_dim key)"
            )
        for modality, encoder in encoders.items():
            if encoder.modality != modality:
                raise ConfigError(f"encoder under key {modality!r} is a {encoder.modality!r} encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.anchor_modality = anchor_modality
        self.embed_dim = next(iter(dims.values()))
        self.shared_trunks: dict[str, str] = {}  # modality -> modality whose trunk it shares
        self.class_names: list[str] | None = None  # what label i meant in training (saved in config.json)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def __getitem__(self, modality: str) -> ModalityEncoder:
        if modality not in self.encoders:
            raise ConfigError(
                f"no modality {modality!r}; {did_you_mean(modality, self.encoders)}the model has: {', '.join(self.encoders)}"
            )
        return self.encoders[modality]  # type: ignore[return-value]

    def forward(self, modality: str, batch: Any) -> Tensor:
        """Collated batch of one modality -> (B, embed_dim) unit-norm embeddings."""
        return self[modality](batch)

    def embed(self, modality: str, inputs: Sequence[Any], batch_size: int = 64) -> Tensor:
        """Raw inputs (paths, strings, arrays or tensors) -> (N, embed_dim) unit-norm embeddings, no grad."""
        return self[modality].embed(inputs, batch_size=batch_size)

    def encode(
        self,
        modality: str,
        inputs: Any,
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        device: str | torch.device | None = None,
    ) -> np.ndarray | Tensor:
        """Embed raw inputs, as sentence-transformers' ``encode`` does: unit-norm rows in input order, no grad.

        ``inputs``: a list of raw items (file paths, strings, arrays), or one path or string, which gives one
        row as a 1-D result. ``show_progress_bar``: None shows it for more than one batch. ``device``: where
        to run (default: where the model is). Returns a float32 numpy array, or a tensor when
        ``convert_to_numpy`` is False. The model is put in eval mode.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive number of items, got {batch_size}")
        encoder = self[modality]
        single = isinstance(inputs, (str, os.PathLike))
        items = [inputs] if single else list(inputs)
        if device is not None:
            self.to(device)
        self.eval()
        show = len(items) > batch_size if show_progress_bar is None else show_progress_bar
        out = []
        with torch.no_grad():
            starts = range(0, len(items), batch_size)
            for start in tqdm(starts, desc=f"encode {modality}", unit="batch", disable=not show):
                out.append(encoder.embed(items[start : start + batch_size], batch_size=batch_size).float().cpu())
        z = torch.cat(out) if out else torch.empty(0, self.embed_dim)
        z = z[0] if single else z
        return z.numpy() if convert_to_numpy else z

    def share_trunk(self, modality: str, source: str, mode: str = "share") -> None:
        """Start ``modality``'s frame encoder from ``source``'s encoder (video from image, ImageBind-style).

        ``mode="share"`` ties the weights, ``"copy"`` copies them once.
        """
        encoder = self[modality]
        if not hasattr(encoder, "use_frame_encoder_from"):
            raise ConfigError(f"the {modality!r} encoder has no frame encoder to take from {source!r}")
        encoder.use_frame_encoder_from(self[source], mode=mode)
        if mode == "share":
            self.shared_trunks[modality] = source

    # ---- saving and loading --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "anchor_modality": self.anchor_modality,
            "embed_dim": self.embed_dim,
            "encoders": {
                m: {
                    **e.build_args,
                    "freeze": e.frozen_part,
                    "unfreeze_last_blocks": e.unfreeze_last_blocks,
                    **({"lora": lora_config(e)} if lora_config(e) else {}),  # re-applied before the weights load
                }
                for m, e in self.encoders.items()
            },
            "shared_trunks": dict(self.shared_trunks),
            "class_names": self.class_names,
            # so that loading without the plugin can say which --plugin registers a missing encoder
            "encoder_modules": _encoder_modules(self.encoders.values()),
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json``, ``model.safetensors`` and any encoder assets into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config()
        for modality, encoder in self.encoders.items():
            if not encoder.build_args:
                raise ConfigError(
                    f"the {modality!r} encoder was not built by the registry (create_encoder), so it cannot be "
                    "rebuilt on load; register its factory with @register_encoder and build it by name"
                )
            overrides = encoder.export_assets(directory / "assets" / modality)
            if overrides:
                config["encoders"][modality]["kwargs"] = {**encoder.build_args["kwargs"], **overrides}
                config["encoders"][modality]["assets"] = True
            if "lora" in config["encoders"][modality]:  # also in peft's format; the reload reads model.safetensors
                save_adapter(encoder, directory / "assets" / modality / ADAPTER_DIR)
        atomic_write(directory / CONFIG_NAME, json.dumps(config, indent=2).encode())
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(_unique_tensors(self.state_dict()), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        return directory

    @classmethod
    def from_config(cls, config: Mapping[str, Any], root: Path | None = None) -> BindModel:
        """Build (untrained) encoders from a config as written by :meth:`config` (``root``: its directory)."""
        where = str(root / CONFIG_NAME) if root is not None else "model config"
        _check_config(config, where)
        modules = config.get("encoder_modules") or {}  # absent in configs written before it was recorded
        encoders = {}
        for modality, spec in config["encoders"].items():
            kwargs = dict(spec.get("kwargs", {}))
            if root is not None:  # exported assets live inside the model directory, and nothing else may be read
                kwargs = _paths_inside(kwargs, root, f"{where}: encoders.{modality}.kwargs")
            try:
                encoder = create_encoder(spec["name"], **kwargs)
            except UnknownEncoderError as err:
                missing = err.name or spec["name"]
                what = (
                    f"encoder {missing!r} is not registered"
                    if missing == spec["name"]
                    else f"encoder {spec['name']!r} needs encoder {missing!r}, which is not registered"
                )
                raise UnknownEncoderError(
                    f"{where}: the {modality!r} {what}; {_plugin_hint(modules.get(missing))}",
                    name=missing,
                ) from None
            encoder.freeze(spec.get("freeze", "none"), spec.get("unfreeze_last_blocks", 0))
            if spec.get("lora") is not None:  # before the weights load, so the adapter weights have a place
                apply_lora_from_config(encoder, spec["lora"], f"{where}: encoders.{modality}.lora")
            encoders[modality] = encoder
        model = cls(encoders, config["anchor_modality"])
        for modality, source in config.get("shared_trunks", {}).items():
            model.share_trunk(modality, source, "share")
        class_names = config.get("class_names")
        if class_names is not None and not (
            isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)
        ):
            raise ConfigError(f"{where}: class_names: expected a list of strings or null, got {class_names!r}")
        model.class_names = class_names
        return model

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], plugins: Sequence[str] = (), map_location: str = "cpu"
    ) -> BindModel:
        """Rebuild a model saved by :meth:`save_pretrained`."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise DataError(f"{directory}: no such directory; expected a model directory written by `bindkit run`")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DataError(
                    f"{path} is missing: {directory} is not a complete bindkit model directory; `bindkit run` "
                    f"(BindModel.save_pretrained) writes {CONFIG_NAME} and {WEIGHTS_NAME} when training ends: "
                    "pass a finished run, or run it again"
                )
        load_plugins(list(plugins))
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{config_path} is not valid JSON ({err}); it is written by `bindkit run`: restore it from the run"
            ) from err
        model = cls.from_config(config, root=directory)
        _load_weights(model, weights_path, map_location)
        return model


def _check_config(config: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the key when ``config`` is not a model config this bindkit reads."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a JSON object (a bindkit model config), got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(
            f"{where}: format_version: expected an integer, got {version!r}; the file was not written by bindkit"
        )
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{where}: model format_version {version} is not supported by this bindkit (reads up to "
            f"{FORMAT_VERSION}): a newer bindkit wrote it; upgrade bindkit (`pip install -U bindkit`) to load it"
        )
    encoders = config.get("encoders")
    if not isinstance(encoders, Mapping) or not encoders:
        raise ConfigError(f"{where}: encoders: expected a mapping of modality -> encoder spec, got {encoders!r}")
    for modality, spec in encoders.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where}: encoders.{modality}.name: expected an encoder name, got {spec!r}")
        if not isinstance(spec.get("kwargs", {}), Mapping):
            raise ConfigError(f"{where}: encoders.{modality}.kwargs: expected a mapping, got {spec['kwargs']!r}")
    if not isinstance(config.get("anchor_modality"), str):
        raise ConfigError(f"{where}: anchor_modality: expected a modality name, got {config.get('anchor_modality')!r}")


def _encoder_modules(encoders: Iterable[ModalityEncoder]) -> dict[str, str]:
    """Registry name -> module that registered it, for these encoders and encoders they hold (video frames)."""
    modules: dict[str, str] = {}
    seen: set[int] = set()
    registered = set(list_encoders())
    stack = list(encoders)
    while stack:
        encoder = stack.pop()
        if id(encoder) in seen:
            continue
        seen.add(id(encoder))
        name = encoder.build_args.get("name")
        if name in registered:  # an encoder not built by the registry cannot be saved: save_pretrained says so
            modules[name] = get_encoder_info(name).module
        # a held encoder may be a plain attribute rather than a submodule (VideoFramesEncoder.frame_encoder)
        stack += [m for m in (*encoder.modules(), *vars(encoder).values()) if isinstance(m, ModalityEncoder)]
    return dict(sorted(modules.items()))


def _plugin_hint(module: str | None) -> str:
    """What to do about an encoder that a saved model needs and the registry lacks."""
    if not module:  # configs written before encoder_modules, or a name nested in another encoder's arguments
        return (
            "load the module that registers it with --plugin MODULE (Python: bind.load_plugins(['MODULE'])); "
            "`bindkit encoders` lists the registered ones"
        )
    if module == "encoders" or module.startswith("encoders."):
        return (
            f"it is built into the bindkit that saved the model ({module}) but not into this one: "
            "install the same or a newer bindkit"
        )
    return (
        f"it is registered by module {module!r}: load it with --plugin {module} "
        f"(Python: bind.load_plugins([{module!r}]))"
    )


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys are one tensor under several names (tied weights)."""
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _unique_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with each tied tensor kept once, under its first name (safetensors refuses aliases)."""
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for name, tensor in state.items():
        key = _tensor_key(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().contiguous()
    return out


def _load_weights(model: nn.Module, path: Path, device: str) -> None:
    """Load ``path`` into ``model`` strictly, where a tied tensor counts as loaded through any of its names.

    Each tensor is checked before anything is copied: its shape and dtype against the model built from the
    config, and its values for NaN or inf (a diverged or damaged file would give NaN embeddings, not an error).
    """
    try:
        saved = load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise DataError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt: restore it, or run again"
        ) from err
    state = model.state_dict()
    expected = _unique_tensors(state)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        raise DataError(
            f"{path} does not match the model its config.json describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the directory's files come from different runs"
        )
    for name, tensor in saved.items():
        _check_tensor(path, name, tensor, state[name])
    model.load_state_dict(saved, strict=False)


_FINITE_BLOCK = 1 << 22  # elements checked at once: a bounded mask however large the tensor


def _check_tensor(path: Path, name: str, tensor: Tensor, target: Tensor) -> None:
    """Raise :class:`DataError` naming ``path`` and ``name`` when a saved tensor cannot stand in for ``target``."""
    built = f"the model built from {CONFIG_NAME} expects"
    if tensor.shape != target.shape:
        raise DataError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, {built} {tuple(target.shape)}; "
            "the directory's files come from different runs or were edited: restore them, or run again"
        )
    # A float tensor of another precision (a model saved after .half()) is cast on load, as load_state_dict does;
    # a float where an integer counter or a bool mask belongs (or the reverse) is not a model's file.
    if tensor.dtype != target.dtype and not (tensor.is_floating_point() and target.is_floating_point()):
        raise DataError(
            f"{path}: tensor {name!r} has dtype {_dtype_name(tensor)}, {built} {_dtype_name(target)}; "
            "the directory's files come from different runs or were edited: restore them, or run again"
        )
    if tensor.is_floating_point() or tensor.is_complex():
        bad = sum(int((~torch.isfinite(block)).sum()) for block in tensor.reshape(-1).split(_FINITE_BLOCK))
        if bad:
            raise DataError(
                f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the weights are "
                "damaged (or training diverged): restore the file or an earlier checkpoint, or run again"
            )


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _paths_inside(kwargs: Mapping[str, Any], root: Path, where: str) -> dict[str, Any]:
    """``kwargs`` with each file argument (``path``, ``*_path``, also nested) resolved inside ``root``.

    A saved model refers only to files it holds itself (``assets/<modality>``, written by
    :meth:`ModalityEncoder.export_assets`); a config.json that names ``../x``, ``/etc`` or a symlink
    leading out of ``root`` is refused rather than followed.
    """
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            value = _paths_inside(value, root, f"{where}.{key}")
        elif (key == "path" or key.endswith("_path")) and isinstance(value, (str, os.PathLike)):
            value = str(resolve_inside(root, value, f"{where}.{key}"))
        out[key] = value
    return out


def resolve_inside(folder: Path, relative: str | os.PathLike[str], where: str) -> Path:
    """``folder / relative`` resolved (symlinks followed); :class:`DataError` when that leaves ``folder``.

    ``where`` names the file and key the path came from, e.g. ``"runs/x/config.json: encoders.text.kwargs.path"``.
    """
    base = Path(folder).resolve()
    target = (base / relative).resolve()  # an absolute ``relative`` replaces base, and is refused below
    if not target.is_relative_to(base):
        raise DataError(
            f"{where}: {os.fspath(relative)!r} resolves to {target}, outside {base}; only files inside that folder "
            "are read (the file was edited, or comes from an untrusted source)"
        )
    return target


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
