"""Exceptions bindkit raises for input a user can fix.

Every message names the file or key at fault, what was expected and what to do. The CLI prints
the message alone (no traceback unless ``--debug``).
"""

from __future__ import annotations


class BindError(Exception):
    """Base class of every error bindkit raises on purpose."""


class ConfigError(BindError, ValueError):
    """A recipe, a config key or an argument has the wrong name, type or value."""


class UnknownEncoderError(ConfigError, KeyError):
    """An encoder name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(BindError, ValueError):
    """A raw input (file, array, text) cannot be turned into a tensor."""


class DataError(BindError, OSError):
    """A data file or folder is missing or unreadable."""
