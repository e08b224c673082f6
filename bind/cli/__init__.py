"""The ``bindkit`` command. One module per verb; each adds its parser and a ``run(args)`` function.

The CLI owns the terminal, and :func:`main` is its one error boundary: errors bindkit raises on purpose
(:class:`~bind.errors.BindError`) and the library exceptions of reading and writing files
(:data:`bind.safe_io.BOUNDARY_ERRORS`: OSError, UnicodeDecodeError, csv.Error, RecursionError,
UnpicklingError, SafetensorError, ...) print as one line on stderr, naming the file, and exit with status 2;
``--debug`` (or ``BINDKIT_DEBUG=1``) shows the traceback instead. Any other exception is a bug and keeps its
traceback.

Starting is cheap: this package and every verb module import no torch, numpy or transformers at module level
(each verb imports what it needs inside its ``run``, after checking its arguments and input files), so
``bindkit --help``, ``--version`` and a bad argument answer in a fraction of a second
(``bindkit bench startup`` times them; tests/test_startup.py keeps the heavy modules out).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import BindError
from ..safe_io import BOUNDARY_ERRORS, error_line
from ..train.malloc import tune_malloc
from . import bench as bench_verb
from . import check_encoder as check_verb
from . import data as data_verb
from . import doctor as doctor_verb
from . import embed as embed_verb
from . import encoders as encoders_verb
from . import eval as eval_verb
from . import index as index_verb
from . import losses as losses_verb
from . import plot as plot_verb
from . import recipe_keys as keys_verb
from . import retrieve as retrieve_verb
from . import run as run_verb
from . import serve as serve_verb
from . import shard as shard_verb
from . import validate as validate_verb

VERBS = [
    encoders_verb,
    losses_verb,
    validate_verb,
    run_verb,
    eval_verb,
    embed_verb,
    retrieve_verb,
    index_verb,
    serve_verb,
    bench_verb,
    plot_verb,
]
VERBS += [shard_verb, data_verb, doctor_verb]
VERBS += [keys_verb]
VERBS += [check_verb]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bindkit", description="Bind modality encoders into one embedding space.")
    parser.add_argument("--version", action="version", version=f"bindkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (also: BINDKIT_DEBUG=1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    for verb_parser in sub.choices.values():  # module docstrings double as help: keep their lines, drop markup
        verb_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        verb_parser.description = plain_text(verb_parser.description)
    return parser


def plain_text(text: str | None) -> str | None:
    """Docstring markup (``code``, :func:`name`) as plain text for a terminal."""
    if text is None:
        return None
    text = re.sub(r":(?:func|class|meth|mod|attr):`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option, so `run R --out D a=b` and
    # `bench gpu --json a=b` would leave `a=b` over: key=value words after options belong to it too
    field = next((name for name in ("overrides", "options") if hasattr(args, name)), None)
    if extra and field and all("=" in word and not word.startswith("-") for word in extra):
        getattr(args, field).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _quiet_transformers(args.verbose)
    tune_malloc()
    args.debug = debug = args.debug or os.environ.get("BINDKIT_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except BindError as err:
        if debug:
            raise
        print(f"bindkit {args.verb}: error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except BOUNDARY_ERRORS as err:  # a library's error about a file (full disk, a pickle, bad bytes): name the file
        if debug:
            raise
        print(f"bindkit {args.verb}: error: {_one_line(error_line(err))}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _one_line(message: str) -> str:
    """Messages that quote a parser (YAML errors) span several lines; stderr gets one."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _quiet_transformers(verbose: bool) -> None:
    """Hugging Face prints a progress bar per local weight load; the CLI owns the terminal.

    Without importing transformers (half a second; most verbs never need it): through the environment variables
    transformers and huggingface_hub read when they are imported, and directly where they already are. A user's
    own ``HF_HUB_DISABLE_PROGRESS_BARS`` is left as set (huggingface_hub gives it priority anyway)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not verbose:
            hf_logging.set_verbosity_error()
