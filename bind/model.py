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

import inspect
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor, nn

from .budget import MemoryCheck, memory_budget
from .encoder import ModalityEncoder
from .errors import ConfigError, DataError, InputError, UnknownEncoderError, did_you_mean
from .hub import push_folder, resolve_model, write_model_card
from .inputs import walk_files
from .lora import ADAPTER_DIR, apply_lora_from_config, lora_config, save_adapter
from .model_files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    check_config,
    load_weights,
    paths_inside,
    unique_tensors,
)
from .registry import create_encoder, get_encoder_info, list_encoders, load_plugins, reading_inside
from .safe_io import atomic_outputs, read_json


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
        num_workers: int | None = None,
    ) -> np.ndarray | Tensor:
        """Embed raw inputs, as sentence-transformers' ``encode`` does: unit-norm rows in input order, no grad.

        ``inputs``: a list of raw items (file paths, strings, arrays), or one path or string, which gives one
        row as a 1-D result, or a folder: its files of this modality, subfolders included, sorted (one row each;
        ``bind.inputs.walk_files`` lists them in that order). ``show_progress_bar``: None shows it for more than one batch. ``device``: where
        to run (default: where the model is). ``num_workers``: DataLoader processes reading and preprocessing the
        next batches while the model runs (None: :func:`bind.encoder.default_workers`, none for texts
        and none on a CPU whose cores torch's threads all use; 0: read in this process). Returns a float32 numpy array, or a tensor when
        ``convert_to_numpy`` is False. The model is put in eval mode.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive number of items, got {batch_size}")
        encoder = self[modality]
        single = isinstance(inputs, (str, os.PathLike))
        folder = single and not encoder.takes_text and Path(inputs).is_dir()
        if folder:  # a folder's files of this modality, its subfolders included, in sorted order (as the CLI)
            items = walk_files(inputs, encoder.file_suffixes)
            if not items:
                kinds = f" ({', '.join(encoder.file_suffixes)})" if encoder.file_suffixes else ""
                raise DataError(f"{inputs}: the folder (and its subfolders) holds no {modality} files{kinds}")
            single = False
        else:
            items = [inputs] if single else list(inputs)
        if device is not None:
            self.to(device)
        self.eval()
        show = len(items) > batch_size if show_progress_bar is None else show_progress_bar
        z = encoder.embed(items, batch_size, workers=num_workers, show_progress=show).float().cpu()
        z = z[0] if single else z
        return z.numpy() if convert_to_numpy else z

    def share_trunk(self, modality: str, source: str, mode: str = "share") -> None:
        """Give ``modality``'s encoder ``source``'s trunk (:meth:`ModalityEncoder.share_trunk_with`; e.g. a
        video encoder's frames through the image tower, as ImageBind does).

        ``mode="share"`` ties the weights (saved as such), ``"copy"`` copies them once.
        """
        self[modality].share_trunk_with(self[source], mode=mode)
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

    def save_pretrained(self, directory: str | os.PathLike[str], card_name: str | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors``, any encoder assets and a model card (``README.md``, left
        alone when a person wrote it) into ``directory``: a folder every command taking a model accepts.
        ``card_name``: how the card names the model (default: the folder's name; a hub id when publishing)."""
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
        # the weights and the config that describes them as one unit: a failed write (a full disk) leaves the
        # previous pair, never new weights beside an old config, and no temporary file
        with atomic_outputs([directory / WEIGHTS_NAME, directory / CONFIG_NAME]) as (weights, config_file):
            weights.write(save(unique_tensors(self.state_dict()), metadata={"format": "pt"}))
            config_file.write(json.dumps(config, indent=2).encode())
        write_model_card(directory, config, card_name)
        return directory

    @classmethod
    def from_config(cls, config: Mapping[str, Any], root: Path | None = None, confine: Path | None = None) -> BindModel:
        """Build (untrained) encoders from a config as written by :meth:`config` (``root``: its directory;
        ``confine``: where links in it may lead, see :func:`bind.model_files.paths_inside`).

        A config may come from anyone: with ``root``, every file it names must lie inside ``root``
        (:func:`bind.registry.reading_inside`), and the towers it declares must fit the memory budget
        (:mod:`bind.budget`), both refused in one line naming the key before anything is read or allocated."""
        where = str(root / CONFIG_NAME) if root is not None else "model config"
        check_config(config, where)
        modules = config.get("encoder_modules") or {}  # absent in configs written before it was recorded
        memory = MemoryCheck(memory_budget("cpu"))  # the sizes a config declares are counted before any is built
        encoders = {}
        for modality, spec in config["encoders"].items():
            kwargs = dict(spec.get("kwargs", {}))
            key = f"encoders.{modality}"
            # exported assets live inside the model directory, and nothing else may be read: the arguments named
            # path or *_path (nested ones too), and those the encoders declare as files (bind.registry.FileArg)
            inside = reading_inside(root, f"{where}: {key}.kwargs", confine) if root is not None else nullcontext()
            try:
                with inside:
                    if root is not None:
                        kwargs = paths_inside(kwargs, root, f"{where}: {key}.kwargs", confine)
                    memory.admit(spec["name"], kwargs, where, key, lambda arg, key=key: f"{key}.kwargs.{arg}")
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
            except (ConfigError, InputError, DataError) as err:  # the factory's own one-line refusal
                if type(err) not in (ConfigError, InputError, DataError) or str(err).startswith(where):
                    raise
                raise type(err)(f"{where}: {key}.kwargs: {err}") from None
            except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # torch's, for sizes no factory checks
                raise ConfigError(
                    f"{where}: {key}.kwargs: encoder {spec['name']!r} cannot be built from them "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from None
            try:
                encoder.freeze(spec.get("freeze", "none"), spec.get("unfreeze_last_blocks", 0))
            except ConfigError as err:
                raise ConfigError(f"{where}: {key}.unfreeze_last_blocks: {err}") from None
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
        cls, name_or_path: str | os.PathLike[str], plugins: Sequence[str] = (), map_location: str = "cpu"
    ) -> BindModel:
        """Rebuild a model saved by :meth:`save_pretrained`: a folder (a training run is one), or a hub id
        (``org/name``, ``org/name@revision``) resolved through Hugging Face's cache (:mod:`bind.hub`)."""
        source = resolve_model(name_or_path)
        directory = source.directory
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DataError(
                    f"{path} is missing: {name_or_path} is not a complete bindkit model folder; BindModel.save_pretrained "
                    f"(and `bindkit run` when training ends) writes {CONFIG_NAME} and {WEIGHTS_NAME}: pass a finished "
                    "run or a saved model"
                )
        load_plugins(list(plugins))
        config = read_json(config_path, "a model config written by BindModel.save_pretrained", error=ConfigError)
        model = cls.from_config(config, root=directory, confine=source.confine)
        load_weights(model, weights_path, map_location)
        return model

    @classmethod
    def from_encoders(
        cls,
        encoders: Mapping[str, ModalityEncoder | str | tuple[str, Mapping[str, Any]]],
        anchor_modality: str | None = None,
        **shared: Any,
    ) -> BindModel:
        """A model assembled from towers, no training: each value an encoder, a registry name, or (name, kwargs).

        ``shared`` arguments go to every named factory that takes them (``checkpoint=`` for ImageBind's towers,
        ``embed_dim=``); ``anchor_modality`` defaults to the first modality. Example, ImageBind's space::

            model = BindModel.from_encoders(
                {m: f"imagebind_{m}" for m in ("image", "text", "audio")}, checkpoint="imagebind_huge.pth"
            )
            model.save_pretrained("models/imagebind")   # a model folder every bindkit command takes
        """
        built = {}
        for modality, spec in encoders.items():
            if isinstance(spec, ModalityEncoder):
                built[modality] = spec
                continue
            name, kwargs = (spec, {}) if isinstance(spec, str) else spec
            accepted = inspect.signature(get_encoder_info(name).factory).parameters
            extra = {k: v for k, v in shared.items() if k in accepted and k not in kwargs}
            built[modality] = create_encoder(name, **extra, **dict(kwargs))
        return cls(built, anchor_modality or next(iter(built)))

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None, commit_message: str | None = None
    ) -> str:
        """Save this model (with its model card) and upload it to hub repository ``repo_id``; the commit's URL.

        A folder already saved (a training run, with its eval.json) can be uploaded as it is:
        ``hf upload org/name runs/digits``."""
        with tempfile.TemporaryDirectory(prefix="bindkit-push-") as folder:
            self.save_pretrained(folder, card_name=repo_id)
            return push_folder(Path(folder), repo_id, private, token, commit_message or "Upload bindkit model")


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
