"""CLIP's byte-pair tokenizer, as OpenAI CLIP, OpenCLIP and ImageBind tokenize text (49,408 tokens, 77 per text).

The vocabulary is CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (the merges, 1.3 MB). bindkit does not ship it: it comes
with the ``open_clip_torch`` package (``pip install -c constraints.txt -e '.[openclip]'``) or ImageBind's, and
:func:`find_bpe_vocab` looks there; any copy can be passed as a path instead.

Text is cleaned (``ftfy``, HTML unescaping, whitespace), lower-cased, split by CLIP's pattern, byte-encoded and
merged; a tokenized text is ``[start, tokens..., end]`` zero-padded to the context length, and a text that is too
long keeps its first ``context_length - 2`` tokens before the end token. The end token has the largest id, so
``tokens.argmax(-1)`` finds it (CLIP's text pooling).

Example::

    tok = CLIPTokenizer(find_bpe_vocab())
    tok("a dog").tolist()[:4]   # [49406, 320, 1929, 49407]
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from bind import ConfigError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges: 256 bytes x 2 + merges + 2 specials = 49,408
START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's split: special tokens, English contractions, runs of letters, single digits, runs of other non-space marks
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def find_bpe_vocab(path: str | os.PathLike[str] | None = None) -> Path:
    """CLIP's vocabulary file: ``path`` if given, else the copy inside an installed ``open_clip`` or ``imagebind``."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"bpe_path: {str(p)!r} is not a file; expected CLIP's {VOCAB_FILE} (from {VOCAB_URL})")
        return p
    for package, inside in (("open_clip", VOCAB_FILE), ("imagebind", f"bpe/{VOCAB_FILE}")):
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / inside).is_file():
                return Path(folder) / inside
    raise ConfigError(
        f"CLIP's tokenizer vocabulary {VOCAB_FILE} was not found: install open_clip_torch, which ships it "
        f"(`pip install -c constraints.txt -e '.[openclip]'`), or download {VOCAB_URL} and pass bpe_path=FILE"
    )


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character, in vocabulary order: the bytes that print (as themselves) first, then
    the other 68 bytes, which map to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _clean(text: str) -> str:
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's BPE tokenizer over the vocabulary file at ``vocab_path``; ``__call__`` gives ``(context_length,)`` ids."""

    def __init__(self, vocab_path: str | os.PathLike[str], context_length: int = 77) -> None:
        import regex

        self.vocab_path = Path(vocab_path)
        try:
            with gzip.open(self.vocab_path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"bpe_path: {str(vocab_path)!r} is not CLIP's gzipped vocabulary ({type(err).__name__}: {err}); "
                f"expected {VOCAB_FILE} (from {VOCAB_URL})"
            ) from None
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ConfigError(
                f"bpe_path: {str(vocab_path)!r} holds {len(merges)} merges, expected CLIP's {NUM_MERGES} pairs "
                f"(the file {VOCAB_FILE} from {VOCAB_URL})"
            )
        symbols = list(_byte_to_unicode().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.context_length = context_length
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {START: [START], END: [END]}

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-token (its last one marked ``</w>``) by rank, lowest first."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens."""
        table = _byte_to_unicode()
        ids = []
        for piece in self.pattern.findall(_clean(text)):
            ids.extend(self.encoder[token] for token in self._bpe("".join(table[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, text: str) -> Tensor:
        ids = [self.start_id, *self.encode(text)][: self.context_length - 1] + [self.end_id]
        out = torch.zeros(self.context_length, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        return out
