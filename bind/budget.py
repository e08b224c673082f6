"""A memory budget a model's towers are held to before anything is allocated.

A tower's sizes come from places anyone may write: a recipe, a stranger's config.json, a checkpoint whose
tensors declare them (a few hundred KB in ImageBind's format can declare a 16384-wide tower of 256 blocks,
terabytes of weights). Limits per key cannot bound their product, so each tower is first built on PyTorch's
``meta`` device, which records shapes and dtypes and allocates nothing, and its parameter and buffer bytes are
added to the towers' before it; a model over the budget is refused in one line naming the key. ``bindkit
validate``, ``bindkit run`` (before building for real) and :meth:`bind.model.BindModel.from_config` (a saved
model's config.json) check it. Example::

    check = MemoryCheck(memory_budget("cpu"))
    check.admit("audio_vit", {"width": 65536}, "r.yaml", "modalities.audio", lambda k: f"modalities.audio.args.{k}")
    # MemoryBudgetError: r.yaml: modalities.audio: audio_vit with width 65536, 6 blocks and embed_dim 128
    # needs 1.2 TiB of weights; the memory budget is 14 GiB (90% of the 16 GiB of available memory; ...)

The budget is ``$BINDKIT_MEMORY_BUDGET`` (``8GiB``, ``500MB``, a number of bytes), else 90% of the memory
available now (``MemAvailable``, within the cgroup's limit), and on CUDA of the device's free memory if less.
It counts weights only: training adds gradients, optimizer moments (twice the weights with Adam) and
activations. A factory that cannot build on ``meta`` (transformers' ``from_pretrained`` refuses to) is built
without the count.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import BindError, ConfigError
from .registry import create_encoder, get_encoder_info

log = logging.getLogger(__name__)

ENV_VAR = "BINDKIT_MEMORY_BUDGET"
AVAILABLE_SHARE = 0.9  # of the memory available now: the rest is for the process itself, data and the OS
_PREFIXES = "kmgtp"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgtp])(i?))?(b?)\s*", re.IGNORECASE)


class MemoryBudgetError(ConfigError):
    """A model's towers need more memory for their weights than the budget allows; the message names the key."""


def parse_size(text: str, where: str = ENV_VAR) -> int:
    """Bytes of ``"8GiB"``, ``"8G"`` (binary), ``"8GB"`` (decimal), ``"512MiB"`` or ``"1000000"``."""
    match = _SIZE.fullmatch(text)
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"{where}: expected a size such as 8GiB, 500MB or a number of bytes, got {text!r}")
    number, prefix, binary, byte = match.groups()
    power = _PREFIXES.index(prefix.lower()) + 1 if prefix else 0
    base = 1000 if byte and not binary else 1024  # "8GB": SI, as disks and clouds count; "8G", "8GiB": binary
    return int(float(number) * base**power)


def format_size(n: float) -> str:
    """``1.2 TiB``, ``18 GiB``, ``640 B``: two significant figures at least."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.1f} {unit}" if unit != "B" and n < 10 else f"{n:.0f} {unit}"


_CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable``, within the cgroup's limit; None where unknown."""
    amounts = []
    with suppress(OSError):
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        amounts += [int(found[1]) << 10] if found else []
    if not amounts and hasattr(os, "sysconf"):
        with suppress(ValueError, OSError):  # not on this platform (macOS lacks SC_AVPHYS_PAGES)
            amounts.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cgroup = Path("/sys/fs/cgroup")
    for limit, usage in _CGROUP_FILES:  # v2, then v1: a container's limit, below the machine's memory
        with suppress(OSError, ValueError):  # no such file, or "max": no limit
            amounts.append(int((cgroup / limit).read_text()) - int((cgroup / usage).read_text()))
            break
    return max(min(amounts), 0) if amounts else None


@dataclass(frozen=True)
class Budget:
    """``limit`` bytes of weights (None: unknown, nothing is refused) and where that number comes from."""

    limit: int | None
    source: str


def memory_budget(device: str | torch.device = "cpu") -> Budget:
    """The budget for a model built on the CPU and then moved to ``device`` (``"auto"``: CUDA if available)."""
    if os.environ.get(ENV_VAR):
        return Budget(parse_size(os.environ[ENV_VAR]), ENV_VAR)
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    amounts = []
    ram = available_memory()
    if ram is not None:
        amounts.append((ram, "available memory"))
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        amounts.append((torch.cuda.mem_get_info(torch.device(device))[0], f"free memory of {device}"))
    if not amounts:
        return Budget(None, f"this machine's free memory is unknown; {ENV_VAR} sets a budget")
    amount, what = min(amounts)
    share = f"{AVAILABLE_SHARE:.0%} of the {format_size(amount)} of {what}"
    return Budget(int(amount * AVAILABLE_SHARE), f"{share}; {ENV_VAR}=SIZE sets another")


@dataclass(frozen=True)
class TowerSize:
    """What one tower allocates: ``total`` bytes of parameters and buffers, ``head`` of them its projection."""

    name: str
    total: int
    head: int
    width: int
    blocks: int
    embed_dim: int

    def describe(self) -> str:
        blocks = f", {self.blocks} blocks" if self.blocks else ""
        return f"{self.name} with width {self.width}{blocks} and embed_dim {self.embed_dim}"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each shared one once (meta tensors count as if allocated)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure_tower(name: str, kwargs: Mapping[str, Any]) -> TowerSize | None:
    """Build encoder ``name`` on the meta device and count it; None when its factory cannot build there.

    A factory with ``load_weights`` builds its architecture only (nothing read or downloaded: weights fill the
    same tensors). Errors a real build would raise (:class:`~bind.errors.BindError`) are raised here, first."""
    if "load_weights" in inspect.signature(get_encoder_info(name).factory).parameters:
        kwargs = {**kwargs, "load_weights": False}
    try:
        # the random state stays as it was; modules first imported here keep real tensors
        with torch.random.fork_rng(devices=[]), torch.device("meta"), _imports_off_meta():
            encoder = create_encoder(name, **kwargs)
    except BindError:
        raise
    except Exception as err:  # a factory that reads a value or loads weights while building
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        log.debug("encoder %r cannot be built on the meta device to count its memory (%s); not counted", name, first)
        return None
    blocks = len(encoder.trunk_blocks())
    total, head = module_bytes(encoder), module_bytes(encoder.head)
    return TowerSize(name, total, head, encoder.trunk_dim, blocks, encoder.embed_dim)


# ---- sizes measured before: bindkit validate's edit-validate loop -------------------------------------------------
# Building a tower on the meta device imports its code (transformers' BERT for MiniLM: seconds). ``validate`` only
# advises (``run`` measures every tower again before it builds it), so it reads the sizes an earlier measurement
# wrote here, keyed by everything the size depends on: the encoder, its arguments, the files they name (size and
# modification time), the factory's source file, and the bindkit and torch versions. A wrong entry can only make
# validate's advice wrong; a bad file is ignored and rewritten.
SIZE_CACHE_ENV = "BINDKIT_CACHE"  # the folder of bindkit's own caches; default $XDG_CACHE_HOME/bindkit or ~/.cache
SIZE_CACHE_NAME = "tower-sizes.json"
SIZE_CACHE_ENTRIES = 256  # the newest kept: the file stays small
SIZE_CACHE_BYTES = 1 << 20


def size_cache_path() -> Path | None:
    """Where validate's tower sizes are kept; None when there is no home folder to keep them in."""
    folder = os.environ.get(SIZE_CACHE_ENV) or os.environ.get("XDG_CACHE_HOME")
    if not folder:
        home = os.path.expanduser("~")
        if home == "~":  # no $HOME and no password entry
            return None
        folder = os.path.join(home, ".cache")
    return Path(folder) / ("" if os.environ.get(SIZE_CACHE_ENV) else "bindkit") / SIZE_CACHE_NAME


def _stat(path: Any) -> list[int] | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _canonical(value: Any) -> Any:
    """``value`` as JSON that tells a tuple from a list and ``1`` from ``"1"`` as a key; TypeError for anything else."""
    if isinstance(value, Mapping):
        return ["map", sorted([repr(k), _canonical(v)] for k, v in value.items())]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_canonical(v) for v in value]]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    raise TypeError(f"{type(value).__name__} is not kept in the size cache")


def _code_stamps(factory: Any) -> list[Any]:
    """The source files of the factory's top-level package (each file's size and time) and the versions of the
    libraries towers are built from: what a change of the tower's code would change."""
    import sys

    top = sys.modules.get(factory.__module__.split(".")[0])
    source = inspect.getsourcefile(factory)
    folder = Path(top.__file__).parent if top is not None and getattr(top, "__path__", None) else None
    files = sorted(folder.rglob("*.py")) if folder is not None else [source]
    return [[str(f), _stat(f)] for f in files] + _library_versions()


@functools.cache
def _library_versions() -> list[Any]:
    """The versions of the libraries towers are built from (one lookup per process)."""
    from importlib.metadata import PackageNotFoundError, version

    stamps: list[Any] = []
    for package in ("torch", "torchvision", "torchaudio", "transformers", "open_clip_torch", "peft"):
        try:
            stamps.append([package, version(package)])
        except PackageNotFoundError:
            stamps.append([package, None])
    return stamps


def size_key(name: str, kwargs: Mapping[str, Any]) -> str | None:
    """What a tower's size depends on, as one string; None when it cannot be told (arguments JSON cannot hold)."""
    import hashlib
    import json

    from . import __version__

    info = get_encoder_info(name)
    try:
        files = {arg: _stat(kwargs[arg]) for arg in info.files if kwargs.get(arg) is not None}
        if any(stamp is None for stamp in files.values()):
            return None  # a file that is not there: the run says so
        text = json.dumps(
            [name, _canonical(kwargs), files, _code_stamps(info.factory), __version__],
            sort_keys=True,
            allow_nan=False,
        )
    except (TypeError, ValueError, OSError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _read_sizes(path: Path) -> dict[str, Any]:
    from .safe_io import BOUNDARY_ERRORS, read_json

    try:
        sizes = read_json(path, "bindkit's tower size cache", limit=SIZE_CACHE_BYTES)
    except (BindError, *BOUNDARY_ERRORS):
        return {}
    return sizes if isinstance(sizes, dict) else {}


def _entry_size(entry: Any, name: str) -> TowerSize | None | bool:
    """A cache entry as a :class:`TowerSize`; ``False`` for a tower that cannot be counted on the meta device; None
    for anything else (not there, or not what the cache writes)."""
    fields = ("total", "head", "width", "blocks", "embed_dim")
    if not isinstance(entry, dict) or entry.get("name") != name:
        return None
    if entry == {"name": name, "counted": False}:
        return False
    values = [entry.get(f) for f in fields]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in values):
        return None
    return TowerSize(name, *values)


class SizeCache:
    """``validate``'s remembered tower sizes: the file is read once, and each new count is written at once (a
    cache that cannot be written is left as it is: it only saves time)."""

    def __init__(self) -> None:
        self.path = size_cache_path()
        self._sizes: dict[str, Any] | None = None

    def _entries(self) -> dict[str, Any]:
        if self._sizes is None:
            self._sizes = _read_sizes(self.path) if self.path is not None else {}
        return self._sizes

    def get(self, key: str, name: str) -> TowerSize | None | bool:
        """The size counted before (``False``: the tower could not be counted), None if there is none."""
        return _entry_size(self._entries().get(key), name)

    def put(self, key: str, name: str, size: TowerSize | None) -> None:
        """Remember ``size`` (None: the tower cannot be counted on the meta device)."""
        import dataclasses
        import json

        from .safe_io import BOUNDARY_ERRORS, write_atomic

        sizes = self._entries()
        sizes.pop(key, None)
        sizes[key] = dataclasses.asdict(size) if size is not None else {"name": name, "counted": False}  # newest last
        self._sizes = dict(list(sizes.items())[-SIZE_CACHE_ENTRIES:])
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self._sizes).encode())
        except (BindError, *BOUNDARY_ERRORS) as err:
            log.debug("tower size cache %s not written: %s", self.path, err)


_IMPORT_GUARD = threading.Lock()
_import_guard_depth = 0
_real_imports: tuple[Any, Any] = (None, None)  # builtins.__import__, importlib.import_module


def _off_meta(real_import: Callable[..., Any]) -> Callable[..., Any]:
    def import_off_meta(*args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():  # the device mode is a torch-function mode
            return real_import(*args, **kwargs)

    return import_off_meta


@contextmanager
def _imports_off_meta() -> Iterator[None]:
    """Run the imports of the block outside ``torch.device("meta")``: a module first imported while a tower is built
    there (encoders import torchvision, torchaudio, ... on first use; transformers loads its submodules through
    ``importlib.import_module``) keeps its module-level tensors real (torchaudio's Kaldi ``EPSILON`` on meta broke
    every later fbank). Nested and concurrent blocks share one wrapper, put back when the last one ends."""
    import builtins
    import importlib

    global _import_guard_depth, _real_imports
    with _IMPORT_GUARD:
        if _import_guard_depth == 0:
            _real_imports = (builtins.__import__, importlib.import_module)
            builtins.__import__, importlib.import_module = map(_off_meta, _real_imports)
        _import_guard_depth += 1
    try:
        yield
    finally:
        with _IMPORT_GUARD:
            _import_guard_depth -= 1
            if _import_guard_depth == 0:
                builtins.__import__, importlib.import_module = _real_imports


class MemoryCheck:
    """The towers of one model, admitted one by one against ``budget`` before each is built."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.used = 0
        self.towers: list[str] = []  # the keys admitted so far
        self.sizes = SizeCache()

    def admit(
        self,
        name: str,
        kwargs: Mapping[str, Any],
        source: str,
        tower: str,
        argument_key: Callable[[str], str],
        strict: bool = True,
        remembered: bool = False,
    ) -> TowerSize | None:
        """Count encoder ``name`` built with ``kwargs``; :class:`MemoryBudgetError` when the towers so far and it
        exceed the budget. ``source``: the file; ``tower``: the tower's key in it (``modalities.image``);
        ``argument_key(arg)``: the key of one of its arguments. ``strict=False``: a tower whose meta build fails
        is not counted (``bindkit validate``: the run raises the error, with its key). ``remembered``: take a size
        measured before (:class:`SizeCache`) instead of building the tower again (``bindkit validate``)."""
        # validate's loop remembers; a run (every rank of it) measures and leaves the cache alone
        key = size_key(name, kwargs) if remembered else None
        size = self.sizes.get(key, name) if key is not None else None
        if size is None:
            try:
                size = measure_tower(name, kwargs)
            except BindError:
                if strict:
                    raise
                return None  # not remembered: the run raises the error
            if key is not None:
                self.sizes.put(key, name, size)
        if not size:  # a factory that cannot build on the meta device: not counted
            return None
        self.used += size.total
        limit = self.budget.limit
        if limit is not None and self.used > limit:
            before = f", {format_size(self.used)} with {', '.join(self.towers)}" if self.towers else ""
            raise MemoryBudgetError(
                f"{source}: {self._key(size, name, kwargs, tower, argument_key)}: {size.describe()} needs "
                f"{format_size(size.total)} of weights{before}; the memory budget is {format_size(limit)} "
                f"({self.budget.source})"
            )
        self.towers.append(tower)
        return size

    @staticmethod
    def _key(size: TowerSize, name: str, kwargs: Mapping[str, Any], tower: str, key: Callable[[str], str]) -> str:
        """The key that sets most of the size: embed_dim when the projection dominates, else the file that declares
        the sizes (an ImageBind checkpoint), else the tower."""
        if 2 * size.head > size.total and "embed_dim" in kwargs:
            return key("embed_dim")
        files = [arg for arg in get_encoder_info(name).files if kwargs.get(arg) is not None]
        return key(files[0]) if files else tower


@contextmanager
def hub_offline() -> Iterator[None]:
    """No download in the block: huggingface_hub (transformers, open_clip, torchvision weights in bindkit) offline."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
