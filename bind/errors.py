"""Exceptions bindkit raises for input a user can fix.

Every message names the file or key at fault, what was expected and what to do. The CLI prints
the message alone (no traceback unless ``--debug``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BindError(Exception):
    """Base class of every error bindkit raises on purpose."""


class ConfigError(BindError, ValueError):
    """A recipe, a config key or an argument has the wrong name, type or value."""


class UnknownEncoderError(ConfigError, KeyError):
    """An encoder name is not in the registry; ``name`` is that name (when known)."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UntrustedPluginError(ConfigError):
    """A recipe or run names plugin code the user has not allowed to run (``--trust-plugins``)."""


class InputError(BindError, ValueError):
    """A raw input (file, array, text) cannot be turned into a tensor."""


class DataError(BindError, OSError):
    """A data file or folder is missing or unreadable."""


class TrainingError(BindError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message names the step and the last checkpoint."""


class Interrupted(BindError):
    """SIGTERM or SIGINT stopped a run after it wrote a checkpoint; ``--resume`` continues it."""

    def __init__(self, signal_name: str, stage: str, step: int, checkpoint: object = None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (not the main rank)"
        super().__init__(f"stopped by {signal_name} at stage {stage!r} step {step}; {where}; continue with --resume")
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'image'? "`` for the choices closest to a mistyped ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
