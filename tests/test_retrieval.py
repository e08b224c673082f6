"""Search against brute force, index round trips, and the embed / retrieve / eval commands on a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bind import ConfigError, DataError
from bind.retrieval import SearchIndex, exact_search

REPO = Path(__file__).parents[1]


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block_size", [3, 7, 1000])
def test_exact_search_matches_a_full_sort(block_size):
    queries, gallery = unit_rows(5, 8, 0), unit_rows(50, 8, 1)
    scores, indices = exact_search(queries, gallery, k=4, block_size=block_size)
    full = queries @ gallery.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)


def eighths(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to multiples of 1/8: every inner product of such rows is exact in float32, whatever the
    summation order, so equal rows score exactly equal in any block and in the reference."""
    return np.round(x * 8) / 8


@pytest.mark.parametrize("order", ["random", "ascending", "ties"])
def test_the_threshold_merge_matches_a_full_sort_on_many_blocks(order):
    # ascending: every block beats the k-th best (the top-k path); ties: equal scores keep the earlier row
    queries, gallery = unit_rows(7, 6, 3), unit_rows(3000, 6, 4)
    if order == "ascending":
        gallery = gallery[np.argsort(gallery @ queries[0])]
    if order == "ties":
        queries, gallery = eighths(queries), np.repeat(eighths(gallery[:300]), 10, axis=0)
    scores, indices = exact_search(queries, gallery, k=5, block_size=64)
    full = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)
    np.testing.assert_array_equal(indices, expected)


def tied_gallery(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries and a gallery whose scores hold many exact ties (integer vectors: exact float32 products).

    duplicates: 40 distinct rows, each repeated far apart (tile) and side by side (repeat), so equal rows fall in
    one block and in different blocks; quantized: 2-d vectors of -2..2, so 17 possible scores for 600 rows."""
    rng = np.random.default_rng(seed)
    if kind == "duplicates":
        rows = rng.integers(-3, 4, (40, 5))
        gallery = np.concatenate([np.tile(rows, (6, 1)), np.repeat(rows, 4, axis=0)])
        queries = rng.integers(-3, 4, (9, 5))
    else:
        gallery, queries = rng.integers(-2, 3, (600, 2)), rng.integers(-2, 3, (25, 2))
    return queries.astype(np.float32), gallery.astype(np.float32)


def stable_reference(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    full = queries.astype(np.int64) @ gallery.T.astype(np.int64)  # integers: exact
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, 1), order


@pytest.mark.parametrize("kind", ["duplicates", "quantized"])
@pytest.mark.parametrize("block_size", [1, 7, 64, 4096])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_equal_scores_keep_the_earlier_row_in_a_block_across_blocks_and_in_the_merge(kind, block_size, k):
    """As a stable sort of each query's scores orders them: small blocks (k > block: blocks merge by top-k),
    large ones (one topk over ties), and the threshold merge (many blocks after the first k)."""
    queries, gallery = tied_gallery(kind, seed=k + block_size)
    expected_scores, expected = stable_reference(queries, gallery, k)
    full = queries @ gallery.T
    assert ((full == expected_scores[:, -1:]).sum(1) > 1).all()  # every query's k-th score is tied: the case is ties
    scores, indices = exact_search(queries, gallery, k=k, block_size=block_size)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("kind", ["duplicates", "quantized"])
@pytest.mark.parametrize("num_queries", [1, 25])  # FAISS scores fewer than 20 queries one way, more another
def test_faiss_orders_equal_scores_as_exact_search_does(kind, num_queries):
    pytest.importorskip("faiss")
    queries, gallery = tied_gallery(kind, seed=num_queries)
    queries = np.resize(queries, (num_queries, queries.shape[1]))
    index = SearchIndex(gallery, backend="faiss")
    for k in (1, 5, 30, len(gallery) + 3):  # the last: the whole gallery
        expected_scores, expected = stable_reference(queries, gallery, k)
        scores, indices = index.search_indices(queries, k)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(scores, expected_scores)


def test_k_larger_than_gallery_and_memmapped_gallery(tmp_path):
    gallery = unit_rows(6, 4, 2)
    np.save(tmp_path / "g.npy", gallery)
    scores, indices = exact_search(unit_rows(2, 4, 3), np.load(tmp_path / "g.npy", mmap_mode="r"), k=10, block_size=4)
    assert indices.shape == (2, 6) and sorted(indices[0]) == list(range(6))
    assert (np.diff(scores, axis=1) <= 1e-7).all()


def test_index_save_load_and_faiss_agree_with_exact(tmp_path):
    gallery, queries = unit_rows(200, 16, 4), unit_rows(3, 16, 5)
    names = [f"item{i}" for i in range(200)]
    exact = SearchIndex(gallery, names).search(queries, k=5)
    loaded = SearchIndex.load(SearchIndex(gallery, names).save(tmp_path / "exact")).search(queries, k=5)
    assert loaded == exact
    pytest.importorskip("faiss")
    faiss_index = SearchIndex.load(SearchIndex(gallery, names, backend="faiss").save(tmp_path / "faiss"))
    got = faiss_index.search(queries, k=5)
    assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in exact]
    with pytest.raises(ConfigError, match="3 gallery names for 200"):
        SearchIndex(gallery, names[:3])


def test_a_saved_faiss_index_is_the_one_loaded_and_a_damaged_one_is_one_line(tmp_path):
    """The FAISS index saved is read back (not rebuilt, not silently replaced by exact search), and a folder whose
    files disagree or are damaged is refused naming the file."""
    faiss = pytest.importorskip("faiss")
    gallery, names = unit_rows(50, 8, 6), [f"item{i}" for i in range(50)]
    folder = SearchIndex(gallery, names, backend="faiss").save(tmp_path / "faiss")
    stored = faiss.read_index(str(folder / "index.faiss"))
    assert stored.ntotal == 50 and stored.d == 8
    loaded = SearchIndex.load(folder)
    assert loaded.backend == "faiss" and loaded._faiss is not None and loaded._faiss.ntotal == 50
    np.testing.assert_array_equal(faiss.rev_swig_ptr(loaded._faiss.get_xb(), 50 * 8), gallery.reshape(-1))
    (folder / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(DataError, match=r"index.faiss: not a readable FAISS index"):
        SearchIndex.load(folder)
    SearchIndex(gallery[:10], names[:10], backend="faiss").save(tmp_path / "small")
    (folder / "index.faiss").write_bytes((tmp_path / "small" / "index.faiss").read_bytes())
    with pytest.raises(DataError, match=r"index.faiss: holds 10 x 8 vectors, embeddings.npy 50 x 8"):
        SearchIndex.load(folder)
    (folder / "names.json").write_text('{"backend": "faiss", "names": ["a"]}')
    with pytest.raises(DataError, match=r"names.json: 1 names for 50 rows"):
        SearchIndex.load(folder)


def test_saving_an_index_over_another_replaces_all_its_files_or_none(tmp_path, monkeypatch):
    import bind.safe_io

    first, second = unit_rows(20, 8, 1), unit_rows(30, 8, 2)
    folder = SearchIndex(first, [f"a{i}" for i in range(20)]).save(tmp_path / "index")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bind.safe_io, "_replace_all", full_disk)
    with pytest.raises(DataError, match="unchanged"):
        SearchIndex(second, [f"b{i}" for i in range(30)]).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file, nothing replaced


def bindkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "bind", *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


def test_embed_then_retrieve_by_embeddings_and_names(tiny_run, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a handwritten seven\nthe digit three\n\nsome other words\n")
    out = bindkit("embed", str(tiny_run), "--modality", "text", "--out", str(tmp_path / "g.npy"), f"@{texts}")
    assert out.returncode == 0, out.stderr
    gallery = np.load(tmp_path / "g.npy")
    assert gallery.shape == (3, 16) and gallery.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    (tmp_path / "names.txt").write_text("seven\nthree\nother\n")
    wav = str(REPO.parent / "shared/data/fsdd/recordings/7_nicolas_0.wav")
    out = bindkit(
        "retrieve",
        str(tiny_run),
        "--query-modality",
        "audio",
        "--query",
        wav,
        "--gallery-modality",
        "text",
        "--gallery-embeddings",
        str(tmp_path / "g.npy"),
        "--gallery-names",
        str(tmp_path / "names.txt"),
        "--top-k",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["query"] == wav and len(rows[0]["results"]) == 2
    assert {r["item"] for r in rows[0]["results"]} <= {"seven", "three", "other"}
    # the scores are the cosine similarities of the two embeddings
    from bind.runs import load_run

    model, _ = load_run(tiny_run)
    query = model.embed("audio", [wav]).numpy()
    best = rows[0]["results"][0]
    expected = float((query @ gallery[["seven", "three", "other"].index(best["item"])])[0])
    assert best["score"] == pytest.approx(expected, abs=1e-4)


def test_retrieve_with_gallery_inputs_keeps_them_as_given(tiny_run):
    out = bindkit(
        "retrieve",
        str(tiny_run),
        "--query-modality",
        "text",
        "--query",
        "a seven",
        "--gallery-modality",
        "text",
        "--gallery",
        "a seven",
        "a three",
        "--top-k",
        "1",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["results"][0] == {"item": "a seven", "score": pytest.approx(1.0, abs=1e-4)}


def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path):
    out = bindkit("embed", str(tiny_run), "--modality", "audio", "--out", str(tmp_path / "x.npy"), "missing.wav")
    assert out.returncode == 2 and "missing.wav: file not found" in out.stderr and "Traceback" not in out.stderr
    out = bindkit("eval", str(tmp_path))
    assert out.returncode == 2 and f"{tmp_path / 'config.json'} is missing: the model folder" in out.stderr


def test_eval_json_is_the_binding_matrix(tiny_run):
    out = bindkit("eval", str(tiny_run), "--json", "--max-items", "20")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    modalities = ["image", "text", "audio", "video"]
    assert set(results["retrieval"]) == {f"{a}->{b}" for a in modalities for b in modalities if a != b}
    assert results["retrieval"]["audio->text"]["pair"] == "emergent"
    assert results["retrieval"]["text->image"]["pair"] == "trained"
    for metrics in results["retrieval"].values():
        assert set(metrics) >= {"R@1", "R@5", "R@10", "median_rank", "mAP"}
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1
