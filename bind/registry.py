"""Encoder registry: a decorator registers a factory, ``create_encoder`` builds it by name.

As in timm, the factory's function name is the encoder's name::

    from bind import register_encoder, ModalityEncoder

    @register_encoder(modality="imu", pretrained="none", tiny={"width": 8})
    def imu_cnn(embed_dim: int = 256, width: int = 64) -> ModalityEncoder:
        ...

    list_encoders(modality="imu")          # ['imu_cnn']
    enc = create_encoder("imu_cnn", embed_dim=128)

Third-party encoders need no change to bindkit: import the module that registers them (a recipe's
``plugins:`` list or ``--plugin my_pkg.my_encoders`` on the command line), or declare it in the
entry-point group ``bindkit.encoders`` of the package's metadata, which is loaded on first use.
bindkit's own encoders (the ``encoders`` package) register through that same entry point, declared
in pyproject.toml: nothing in ``bind`` imports them by name.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, TypeVar

from .encoder import ModalityEncoder
from .errors import ConfigError, UnknownEncoderError, UntrustedPluginError, did_you_mean
from .safe_io import resolve_inside

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bindkit.encoders"
DISTRIBUTION = "bindkit"  # whose entry point holds the built-in encoders
Factory = TypeVar("Factory", bound=Callable[..., ModalityEncoder])
TinyArgs = dict[str, Any] | Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class FileArg:
    """An encoder argument that names something on disk to read: ``register_encoder(files={arg: FileArg(...)})``.

    The one declaration both checks use: ``bindkit validate`` checks that it exists, and a model folder's
    config.json (anyone may have written it) is held to files inside that folder (:func:`reading_inside`).
    ``hint``: what to do when it is missing (a download URL, say). ``folder``: it names a folder, not a file.
    ``or_name``: it may instead be a name looked up elsewhere (an OpenCLIP weights tag): a value that is no
    path (no separator, not ``~`` or ``.``-led) and names no existing file.
    """

    hint: str = ""
    folder: bool = False
    or_name: bool = False

    def names_a_path(self, value: str | os.PathLike[str]) -> bool:
        """Whether ``value`` is read from disk (else it is a name, left to the factory's own checks)."""
        text = os.fspath(value)
        separators = {"/", os.sep, os.altsep} - {None}
        bare = bool(text) and not any(sep in text for sep in separators) and text[0] not in ".~"
        return not self.or_name or not bare or Path(text).exists()


@dataclass(frozen=True)
class EncoderInfo:
    """What the registry knows about one encoder.

    ``pretrained`` says where pretrained weights come from ("none" for from-scratch encoders).
    ``tiny`` gives the keyword arguments of a tiny variant for tests: a dict, or a function of a
    scratch directory for towers that must save a tiny pretrained model there first.
    ``augmenter`` builds the encoder's training augmentation from a recipe's ``augment:`` knobs
    (:mod:`bind.data.augment`); ``None``: the encoder offers none.

    What building will need, checked by ``bindkit validate`` without building (:mod:`bind.recipe.checks`):
    ``files`` maps each argument that names a file (or folder) to read to its :class:`FileArg`: what to do
    when it is missing, and whether it names a folder or may be a name instead; a model folder's config.json
    may name such files only inside that folder (:func:`reading_inside`). ``check_args(args)`` checks the rest
    against this machine (hub weights cached when offline, packages installed, a rule across arguments) and raises a
    :class:`ConfigError` or :class:`~bind.errors.DataError` whose message starts with the key at fault,
    relative to the recipe's entry for the encoder: ``"args.pretrained: ..."``, or ``"encoder: ..."``.
    """

    name: str
    modality: str
    factory: Callable[..., ModalityEncoder]
    pretrained: str = "none"
    tiny: TinyArgs = field(default_factory=dict)
    module: str = ""
    augmenter: Callable[..., Any] | None = None
    files: Mapping[str, FileArg] = field(default_factory=dict)
    check_args: Callable[[Mapping[str, Any]], None] | None = None

    def tiny_kwargs(self, scratch_dir: Path) -> dict[str, Any]:
        return self.tiny(scratch_dir) if callable(self.tiny) else dict(self.tiny)

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, EncoderInfo] = {}
_plugins_loaded = False


def register_encoder(
    modality: str,
    *,
    name: str | None = None,
    pretrained: str = "none",
    tiny: TinyArgs | None = None,
    augmenter: Callable[..., Any] | None = None,
    files: Mapping[str, str | FileArg] | None = None,
    check_args: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[Factory], Factory]:
    """Register ``factory`` under its function name (or ``name``) for ``modality`` (see :class:`EncoderInfo`).

    ``files``: ``{argument: FileArg(...)}``, or ``{argument: hint}`` for a file to read."""
    declared = {arg: spec if isinstance(spec, FileArg) else FileArg(spec) for arg, spec in (files or {}).items()}
    if not modality or not isinstance(modality, str):
        raise ConfigError(f"register_encoder needs a modality name (a non-empty string), got {modality!r}")

    def decorator(factory: Factory) -> Factory:
        key = name or factory.__name__
        unknown = sorted(set(declared) - set(inspect.signature(factory).parameters))
        if unknown:
            raise ConfigError(f"register_encoder({key!r}): files names {', '.join(unknown)}, not arguments of it")
        previous = _REGISTRY.get(key)
        if previous is not None and previous.factory.__qualname__ != factory.__qualname__:
            log.warning("encoder %r from %s replaces the one from %s", key, factory.__module__, previous.module)
        _REGISTRY[key] = EncoderInfo(
            key, modality, factory, pretrained, tiny or {}, factory.__module__, augmenter, declared, check_args
        )
        return factory

    return decorator


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import modules that register encoders, then (once) every ``bindkit.encoders`` entry point, the built-ins first."""
    global _plugins_loaded
    for module in modules:
        _import_plugin(module)
    if _plugins_loaded:
        return
    load_builtin_encoders()
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if _is_builtin(ep):
            continue
        try:
            ep.load()
        except Exception as err:  # a broken third-party plugin must not take bindkit down
            log.warning("entry point %r (%s) of group %s failed to load: %s", ep.name, ep.value, ENTRY_POINT_GROUP, err)


def _is_builtin(ep: EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == DISTRIBUTION


def load_builtin_encoders() -> None:
    """Load bindkit's own entry point of ``bindkit.encoders`` (the ``encoders`` package), as a plugin is loaded,
    or say in one line why not.

    A broken install (a torchaudio built for another torch, say) fails here with what to do, instead of
    a traceback from deep inside an import."""
    own = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if _is_builtin(ep)]
    if not own:
        raise ConfigError(
            f"bindkit's built-in encoders register through the {ENTRY_POINT_GROUP!r} entry point of the installed "
            "bindkit package, and none is installed here: install bindkit (`pip install -c constraints.txt -e .` "
            "in the checkout) rather than running it from a source folder"
        )
    for ep in own:
        try:
            ep.load()
        except (ImportError, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(
                f"bindkit's built-in encoders failed to import ({type(err).__name__}: {first[:300]}): the installed "
                "packages do not fit together; `bindkit doctor` shows which, and "
                "`pip install -c constraints.txt -e .` in the bindkit checkout installs the tested versions"
            ) from err


def _import_plugin(module: str) -> None:
    """Import a plugin by module name (also from the current folder, as ``python -m`` would) or by ``.py`` path."""
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"plugin file {module!r} not found; pass a .py file or an importable module name")
        module, spec = path.stem, importlib.util.spec_from_file_location(path.stem, path)
        if module not in sys.modules:  # by name from now on, so saved runs and worker processes find it
            sys.modules[module] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[module])
        return
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # my_sensor.py next to the recipe: importable as `my_sensor`
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"plugin module {module!r} could not be imported ({err}); "
            "check the name and that it is importable (installed, on PYTHONPATH, in the current folder, or a .py path)"
        ) from err


def load_named_plugins(modules: list[str] | tuple[str, ...], where: str, trust: bool = False) -> None:
    """Import the plugins a file names (a recipe's or a run's ``plugins:``), only with the user's consent.

    A recipe or a run directory may come from anyone; importing a module it names runs that module's
    code. As with Hugging Face's ``trust_remote_code``, such modules are imported only when ``trust``
    is true (``--trust-plugins``), or when the user already loaded them (``--plugin MODULE``,
    ``load_plugins``); otherwise the refusal says what would run and how to allow it.
    """
    pending = [module for module in modules if not _plugin_loaded(module)]
    if pending and not trust:
        what = "; ".join(f"{module!r} ({_plugin_origin(module)})" for module in pending)
        raise UntrustedPluginError(
            f"{where} names plugin code that would run on loading: {what}. bindkit runs no code a file names "
            "without your consent: pass --trust-plugins (Python: trust_plugins=True) if you trust where it "
            "came from, or load the module yourself with --plugin MODULE"
        )
    load_plugins(pending)


def _plugin_loaded(module: str) -> bool:
    if module.endswith(".py"):
        loaded = sys.modules.get(Path(module).stem)
        origin = getattr(loaded, "__file__", None)
        return origin is not None and Path(origin).resolve() == Path(module).expanduser().resolve()
    return module in sys.modules


def _plugin_origin(module: str) -> str:
    """The file a plugin would run, found without importing anything."""
    if module.endswith(".py"):
        return str(Path(module).expanduser().resolve())
    top = module.split(".")[0]
    try:  # a top-level name is looked up without running code; a dotted one would import its package
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin and module == top:
        return origin
    if spec is None and (Path.cwd() / f"{top}.py").is_file():  # importable from the current folder
        return str(Path.cwd() / f"{top}.py")
    return f"module {module}" + (f" in {origin}" if origin else ", not found here")


def list_encoders(pattern: str = "*", modality: str | None = None, pretrained: bool = False) -> list[str]:
    """Sorted encoder names matching a glob ``pattern``, optionally of one ``modality``; ``pretrained``: only
    those that load released weights (their :attr:`EncoderInfo.pretrained` says from where), as open_clip's
    ``list_pretrained()``."""
    load_plugins()
    return sorted(
        n
        for n, info in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern)
        and modality in (None, info.modality)
        and not (pretrained and info.pretrained == "none")
    )


def list_modalities() -> list[str]:
    load_plugins()
    return sorted({info.modality for info in _REGISTRY.values()})


def get_encoder_info(name: str) -> EncoderInfo:
    """The :class:`EncoderInfo` for ``name``; unknown names raise with the closest matches."""
    load_plugins()
    if name not in _REGISTRY:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; {did_you_mean(name, _REGISTRY)}`bindkit encoders` lists the registered ones, "
            "and `--plugin MODULE` (or a recipe's `plugins:`) loads encoders from your own module",
            name=name,
        )
    return _REGISTRY[name]


def check_encoder_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``kwargs`` do not fit the factory's signature."""
    info = get_encoder_info(name)
    params = inspect.signature(info.factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"encoder {name!r} does not take argument(s) {', '.join(unknown)}; it takes: {', '.join(params) or 'none'}"
        )


@dataclass(frozen=True)
class _Inside:
    folder: Path
    where: str  # the file and key of the outermost encoder's arguments: "run/config.json: encoders.video.kwargs"
    confine: Path | None
    depth: int = 0  # encoders built by an encoder's factory (a video tower's frame encoder) are deeper


_READING_INSIDE: ContextVar[_Inside | None] = ContextVar("bindkit_reading_inside", default=None)


@contextmanager
def reading_inside(folder: Path, where: str, confine: Path | None = None) -> Iterator[None]:
    """Every encoder built in this block reads the files its arguments declare (:class:`FileArg`) only from inside
    ``folder``, those its factory builds in turn included; one naming ``../x``, ``/etc/passwd`` or a link out
    is refused (:func:`bind.model_files.resolve_inside`, a :class:`DataError` naming ``where`` and the argument)
    before its factory runs. ``confine``: where links inside ``folder`` may lead (a hub snapshot's blobs)."""
    token = _READING_INSIDE.set(_Inside(Path(folder), where, confine))
    try:
        yield
    finally:
        _READING_INSIDE.reset(token)


def _files_inside(info: EncoderInfo, kwargs: dict[str, Any], inside: _Inside) -> dict[str, Any]:
    """``kwargs`` with each declared file argument resolved inside ``inside.folder``, or a refusal."""
    out = dict(kwargs)
    allowed = Path(inside.confine or inside.folder).resolve()
    for key, arg in info.files.items():
        value = out.get(key)
        if not isinstance(value, (str, os.PathLike)) or not (
            arg.names_a_path(value) or (inside.folder / value).exists()
        ):
            continue
        path = Path(value)
        if path.is_absolute() and path == path.resolve() and path.is_relative_to(allowed):
            continue  # already resolved inside (a hub snapshot's link, followed into its blobs)
        where = f"{inside.where}.{key}" if inside.depth == 0 else f"{inside.where} ({info.name}).{key}"
        out[key] = str(resolve_inside(inside.folder, value, where, inside.confine))
    return out


def create_encoder(name: str, **kwargs: Any) -> ModalityEncoder:
    """Build the encoder registered as ``name`` with keyword arguments for its factory."""
    check_encoder_kwargs(name, kwargs)
    info = get_encoder_info(name)
    inside = _READING_INSIDE.get()
    if inside is None:
        encoder = info.factory(**kwargs)
    else:
        kwargs = _files_inside(info, kwargs, inside)
        token = _READING_INSIDE.set(replace(inside, depth=inside.depth + 1))
        try:
            encoder = info.factory(**kwargs)
        finally:
            _READING_INSIDE.reset(token)
    if not isinstance(encoder, ModalityEncoder):
        raise TypeError(f"factory of encoder {name!r} returned {type(encoder).__name__}, not a ModalityEncoder")
    if encoder.modality != info.modality:
        raise ConfigError(
            f"encoder {name!r} is registered for {info.modality!r} but built a {encoder.modality!r} encoder"
        )
    encoder.build_args = {"name": name, "kwargs": dict(kwargs)}
    return encoder
