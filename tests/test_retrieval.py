"""Search against brute force, index round trips, and the embed / retrieve / eval commands on a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bind import ConfigError
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


@pytest.mark.parametrize("order", ["random", "ascending", "ties"])
def test_the_threshold_merge_matches_a_full_sort_on_many_blocks(order):
    # ascending: every block beats the k-th best (the top-k path); ties: equal scores keep the earlier row
    queries, gallery = unit_rows(7, 6, 3), unit_rows(3000, 6, 4)
    if order == "ascending":
        gallery = gallery[np.argsort(gallery @ queries[0])]
    if order == "ties":
        gallery = np.repeat(gallery[:300], 10, axis=0)
    scores, indices = exact_search(queries, gallery, k=5, block_size=64)
    full = queries @ gallery.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)
    if order != "ties":
        np.testing.assert_array_equal(indices, expected)
    else:  # float rounding may order equal rows differently: the scores agree, and each found row has that score
        np.testing.assert_allclose(np.take_along_axis(full, indices, 1), scores, rtol=1e-6)


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
