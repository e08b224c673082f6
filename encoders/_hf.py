"""Hugging Face towers: loading them from local directories or hub ids, and a base class for their encoders.

A hub id (``"sentence-transformers/all-MiniLM-L6-v2"``) resolves through Hugging Face's standard cache
(``$HF_HOME``, ``$HF_HUB_CACHE``), downloading what is missing unless ``$HF_HUB_OFFLINE=1``; a model that is
neither cached nor downloadable is a one-line :class:`~bind.DataError` saying what to download, at once:
:class:`HubFiles` looks in the cache first, and asks the hub once (``$HF_HUB_ETAG_TIMEOUT`` seconds, default 3)
before huggingface_hub would retry an unreachable hub for half a minute per file. A hub that does not answer
while the files are cached means loading from the cache, as offline.

A saved bindkit model keeps the tower's weights in its own ``model.safetensors``; what it also
needs to rebuild the tower (the HF config, the tokenizer or processor files) is exported next to
it by :func:`export_hf`, and reloaded with ``load_weights=False``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bind import DataError, HeadKind, ModalityEncoder, find_blocks

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "bert-base-uncased", "org/name"
PROBE_SECONDS = 3.0  # how long the one request to the hub may take, unless $HF_HUB_ETAG_TIMEOUT says otherwise
PROBE_REUSE_SECONDS = 60.0
_PROBES: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when it was asked, why it did not answer)
CONFIG_FILES = (("config.json",),)
MODEL_FILES = (*CONFIG_FILES, ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json"))  # fmt: skip


@dataclass(frozen=True)
class HubFiles:
    """What a tower needs from hub repository ``repo``: one file of each group in ``needed``.

    ``lead`` starts a refusal (``"hf_text: 'org/name'"``), ``fetch`` is the command that downloads the files,
    ``alternative`` what else the user can pass (``"a local directory"``).
    """

    repo: str
    needed: tuple[tuple[str, ...], ...]
    lead: str
    fetch: str
    alternative: str
    cache_dir: str | None = None
    revision: str | None = None

    def cached(self) -> bool:
        from huggingface_hub import try_to_load_from_cache

        return all(
            any(
                isinstance(try_to_load_from_cache(self.repo, f, cache_dir=self.cache_dir, revision=self.revision), str)
                for f in group
            )
            for group in self.needed
        )

    def refusal(self, state: str) -> str:
        """One line: not in the cache, why it cannot be downloaded now (``state``), and what to do."""
        from huggingface_hub import constants

        cache = self.cache_dir or constants.HF_HUB_CACHE
        return (
            f"{self.lead} is not in the Hugging Face cache ({cache}) and {state}: run `{self.fetch}` on a machine "
            f"with network access (with the same $HF_HOME), or pass {self.alternative}"
        )

    def check_offline(self) -> None:
        """Offline (``$HF_HUB_OFFLINE=1``), a :class:`DataError` unless the files are cached; online, nothing to check."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and not self.cached():
            raise DataError(self.refusal("this process is offline ($HF_HUB_OFFLINE=1)"))

    def local_only(self) -> bool:
        """Before loading: whether it must load from the cache alone (offline, or the hub did not answer one
        request), or may download. Not cached and not downloadable: a one-line :class:`DataError`, at once."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            self.check_offline()
            return True
        silence = hub_silence()
        if silence is None:
            return False
        if not self.cached():
            raise DataError(self.refusal(f"the hub ({constants.ENDPOINT}) did not answer ({silence})"))
        log.warning("the hub (%s) did not answer (%s): %s loads from the cache", constants.ENDPOINT, silence, self.repo)
        return True


def hub_silence() -> str | None:
    """Why the hub gave no answer to one request (DNS, refused, timed out), or None when it answered.

    One request with a short timeout: huggingface_hub retries a download five times with backoff (about 23 s a
    file, and loaders try several files) before it gives up on an unreachable hub. The answer holds for a minute,
    so the towers of one recipe (a model, its config, its tokenizer) ask once."""
    from huggingface_hub import constants, get_session

    asked, silence = _PROBES.get(constants.ENDPOINT, (-math.inf, None))
    if time.monotonic() - asked < PROBE_REUSE_SECONDS:
        return silence
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_SECONDS)
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any status is an answer
        silence = None
    except Exception as err:  # the transport's errors (httpx, requests) share no base class worth importing
        silence = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    _PROBES[constants.ENDPOINT] = (time.monotonic(), silence)
    return silence


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub offline for the block, for loaders that take no ``local_files_only`` (open_clip).

    huggingface_hub reads ``constants.HF_HUB_OFFLINE`` on each request, so this is what ``$HF_HUB_OFFLINE=1`` does."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def resolve_hf(path: str | os.PathLike[str], what: str) -> Path | str:
    """A local model directory (a Path: it must hold ``config.json``) or a hub id (a str), or a clear error."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DataError(
                f"{what}: {str(p)!r} is a directory without config.json; expected a Hugging Face model directory "
                "(saved with `save_pretrained(DIR)`) or a hub id such as 'sentence-transformers/all-MiniLM-L6-v2'"
            )
        return p
    text = os.fspath(path)
    if HUB_ID.fullmatch(text) and ".." not in text and "--" not in text and not p.exists():
        return text
    raise DataError(
        f"{what}: {text!r} is neither a local Hugging Face model directory (with config.json) nor a hub id "
        "(name or org/name); expected e.g. 'sentence-transformers/all-MiniLM-L6-v2' or a folder from save_pretrained"
    )


def hub_model(repo: str, what: str, needed: tuple[tuple[str, ...], ...] = CONFIG_FILES) -> HubFiles:
    """The files of Hugging Face model ``repo`` a tower needs (``what`` names the factory in errors)."""
    return HubFiles(repo, needed, f"{what}: {repo!r}", f"hf download {repo}", "a local directory")


def hf_path_check(what: str) -> Callable[[Mapping[str, Any]], None]:
    """``check_args`` of a Hugging Face tower (``what``): ``path`` is a model directory, or a hub id that is
    cached when offline; a refusal starts with ``args.path:`` (:func:`bind.register_encoder`)."""

    def check(args: Mapping[str, Any]) -> None:
        path = args.get("path")
        if not isinstance(path, (str, os.PathLike)):
            return
        try:
            source = resolve_hf(path, what)
            if isinstance(source, str):
                needed = MODEL_FILES if args.get("load_weights", True) else CONFIG_FILES
                hub_model(source, what, needed).check_offline()
        except DataError as err:
            raise DataError(f"args.path: {err}") from None

    return check


def from_source(
    load: Any, source: Path | str, what: str, needed: tuple[tuple[str, ...], ...] = CONFIG_FILES, **kwargs: Any
) -> Any:
    """``load(source)`` (a ``from_pretrained``): a directory with ``local_files_only``, a hub id through the cache.

    A hub id that is not cached (``needed``: the files looked for) and cannot be downloaded now is refused
    before transformers retries the hub; one that is cached loads from the cache when the hub does not answer."""
    if isinstance(source, Path):
        return load(source, local_files_only=True, **kwargs)
    hub = hub_model(source, what, needed)
    local_only = hub.local_only()
    try:  # transformers reads $HF_HUB_OFFLINE and $HF_HOME through huggingface_hub
        return load(source, local_files_only=local_only, **kwargs)
    except OSError as err:  # no such repository, a file the cache lacks, a failed download
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"{hub.refusal(_state(local_only))} ({first})") from None


def _state(local_only: bool) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "this process is offline ($HF_HUB_OFFLINE=1)"
    return f"the hub ({constants.ENDPOINT}) did not answer" if local_only else "it could not be downloaded"


def load_hf_model(model_cls: Any, path: str | os.PathLike[str], load_weights: bool = True, what: str = "model") -> Any:
    """``model_cls.from_pretrained(path)``, or only its architecture from the config when ``load_weights`` is False.

    ``path`` is a local directory or a hub id (resolved through Hugging Face's cache, ``$HF_HUB_OFFLINE`` honoured).
    """
    source = resolve_hf(path, what)
    if load_weights:
        return from_source(model_cls.from_pretrained, source, what, MODEL_FILES)
    return model_cls._from_config(from_source(model_cls.config_class.from_pretrained, source, what))


def load_hf_processor(processor_cls: Any, path: str | os.PathLike[str], what: str = "processor") -> Any:
    """``processor_cls.from_pretrained(path)`` (a tokenizer, an image or feature processor): a directory or a hub id."""
    return from_source(processor_cls.from_pretrained, resolve_hf(path, what), what)


def export_hf(directory: Path, model: Any, *processors: Any) -> dict[str, Any]:
    """Save ``model``'s config and ``processors`` into ``directory``; return the kwargs to rebuild from it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    for processor in processors:
        if processor is not None:
            processor.save_pretrained(directory)
    return {"path": str(Path(directory.parent.name) / directory.name), "load_weights": False}


# Sizes the tiny image, video and text Hugging Face towers saved for tests share (a tower may override one).
TINY_TRANSFORMER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def save_tiny_hf(path: Path, model_cls: Any, config: Any, *processors: Any) -> str:
    """Save a random ``model_cls(config)`` and ``processors`` in ``path``, unless a model is there; ``str(path)``.

    For the ``tiny`` variants of Hugging Face towers (tests): a scratch directory pays for the model once.
    """
    if not (path / "config.json").is_file():
        model_cls(config).save_pretrained(path)
        for processor in processors:
            processor.save_pretrained(path)
    return str(path)


class HFEncoder(ModalityEncoder):
    """A Hugging Face tower and its processor (tokenizer, image or feature processor).

    Its blocks are the model's layer stack (the longest ``nn.ModuleList``, :func:`bind.find_blocks`), and a
    saved model gets the config and processor files it needs to be rebuilt (:func:`export_hf`).
    """

    def __init__(
        self,
        modality: str,
        model: nn.Module,
        processor: Any,
        trunk_dim: int,
        embed_dim: int,
        head: HeadKind = "linear",
        logit_scale: float = 1 / 0.07,
        learnable_logit_scale: bool = True,
    ) -> None:
        super().__init__(modality, model, trunk_dim, embed_dim, head, logit_scale, learnable_logit_scale)
        self.processor = processor
        self.blocks = find_blocks(model)  # a plain list: the modules stay registered once, under trunk

    def trunk_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def export_assets(self, directory: Path) -> dict[str, Any]:
        return export_hf(directory, self.trunk, self.processor)
