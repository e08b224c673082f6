"""Libraries the encoders import when first used (not when registered), each failure one line saying what to do.

``import encoders`` registers every built-in tower without importing torchvision, torchaudio or PyAV; a tower
imports them through :func:`optional` when it first builds, reads a file or augments. A torchaudio built for
another torch fails there with an undefined symbol: that becomes a :class:`~bind.ConfigError` naming the
library and the fix, not a traceback from inside its import.
"""

from __future__ import annotations

import sys
from types import ModuleType

from bind import ConfigError


def optional(module: str) -> ModuleType:
    """The module ``module`` (imported now if it is not yet); a broken or missing install is one
    :class:`~bind.ConfigError`."""
    try:
        __import__(module)  # through builtins.__import__, as an import statement (bind.budget's meta builds guard it)
        return sys.modules[module]
    except (ImportError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        package = module.split(".")[0]
        raise ConfigError(
            f"{package} failed to import ({type(err).__name__}: {first[:300]}): the installed packages do not fit "
            "together; `bindkit doctor` shows which, and `pip install -c constraints.txt -e .` in the bindkit "
            "checkout installs the tested versions"
        ) from err
