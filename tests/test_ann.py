"""The approximate index: the factory by size, recall against exact search, the saved index and its checks,
the CLI (index, then retrieve with it), and the benchmark's figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from bind import ConfigError, DataError  # noqa: E402
from bind.ann import build_ann, build_index, choose_factory, load_ann, recall_of  # noqa: E402
from bind.cli import main  # noqa: E402
from bind.retrieval import SearchIndex, exact_search, load_embeddings, open_gallery  # noqa: E402


def clustered(rows: int, dim: int, seed: int, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((rows // 100, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), rows)] + rng.standard_normal((rows, dim)).astype(np.float32) / dim**0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres


@pytest.fixture(scope="module")
def data():
    gallery, centres = clustered(20_000, 32, 0)
    queries, _ = clustered(300, 32, 1, centres)  # not in the gallery
    return gallery, queries


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("ann")
    np.save(folder / "g.npy", data[0])
    (folder / "g.names.txt").write_text("".join(f"item{i}\n" for i in range(len(data[0]))))
    ann, meta = build_ann(folder / "g.npy", load_embeddings(folder / "g.npy"))
    return folder, ann, meta


@pytest.mark.parametrize(
    ("rows", "dim", "factory"),
    [
        (999, 256, "Flat"),  # autofaiss's flat threshold
        (20_000, 32, "IVF256,Flat"),  # 4 sqrt(20k) = 566 -> 512, but 40 training rows each: 500 -> 256
        (100_000, 256, "IVF1024,Flat"),  # 4 sqrt(100k) = 1265 -> 1024
        (199_999, 256, "IVF2048,Flat"),
        (200_000, 256, "IVF4096,SQ8"),  # 8-bit codes from 200k rows, 8 sqrt(N) cells: 3578 -> 4096
        (1_000_000, 256, "IVF8192,SQ8"),  # 8 sqrt(1M) = 8000 -> 8192
        (100_000_000, 768, "IVF16384_HNSW32,SQ8"),  # at most 1M training rows / 40 cells; an HNSW quantizer
        (1_500, 32, "IVF32,Flat"),  # few rows: no more cells than 40 training rows each fill
    ],
)
def test_the_factory_is_chosen_by_size_as_autofaiss_does(rows, dim, factory):
    assert choose_factory(rows, dim) == factory


def test_the_built_index_reaches_its_target_recall_on_queries_not_in_the_gallery(data, saved):
    gallery, queries = data
    _, ann, meta = saved
    assert meta["factory"] == "IVF256,Flat" and meta["recall_at_10"] >= 0.95 and 1 <= meta["params"]["nprobe"] < 256
    _, truth = exact_search(queries, gallery, 10)
    scores, found = ann.search(queries, 10, gallery)
    # the tuned figure comes from 1,000 held-out rows: fresh queries land within a sampling error of it
    assert recall_of(list(found), list(truth)) >= 0.92
    # scores are the true inner products of the rows found, best first
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", gallery[found], queries), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    # a negative control: one probe misses many neighbours, so the recall above measured something
    ann.set_params({"nprobe": 1})
    assert recall_of(list(ann.search(queries, 10, gallery)[1]), list(truth)) < 0.9
    ann.set_params(meta["params"])


def test_the_reference_top_rows_match_exact_search(data):
    gallery, queries = data
    from bind.ann import top_rows

    np.testing.assert_array_equal(top_rows(queries, gallery, 10, block=777), exact_search(queries, gallery, 10)[1])


@pytest.mark.parametrize(("factory", "rescore"), [("IVF16,PQ8x4fs", 8), ("IVF16,SQ8", 2)])
def test_a_quantized_index_rescores_its_candidates_exactly(data, factory, rescore):
    gallery, queries = data
    ann = build_index(gallery[:3000], factory, 0.9)
    assert ann.rescore == rescore and ann.recall_at_10 >= 0.9
    scores, found = ann.search(queries, 5, gallery[:3000])
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", gallery[found], queries), atol=1e-5)


def test_the_saved_index_is_memory_mapped_and_searches_as_the_built_one(data, saved):
    gallery, queries = data
    folder, ann, meta = saved
    assert (folder / "g.index").is_file() and json.loads((folder / "g.index.json").read_text()) == meta
    embeddings = load_embeddings(folder / "g.npy")
    loaded = load_ann(folder / "g.npy", embeddings)
    assert loaded.params == meta["params"]
    for got, want in zip(loaded.search(queries, 10, embeddings), ann.search(queries, 10, gallery), strict=True):
        np.testing.assert_array_equal(got, want)
    # open_gallery picks the index up beside the .npy, keeps the names; backend="exact" ignores it
    index = open_gallery(folder / "g.npy")
    assert index.backend == "ann" and index.search(queries[:1], 3) == [
        [
            (f"item{i}", pytest.approx(float(s)))
            for s, i in zip(*(a[0, :3] for a in ann.search(queries[:1], 3, gallery)), strict=True)
        ]
    ]
    exact = open_gallery(folder / "g.npy", backend="exact")
    assert (
        exact.ann is None
        and exact.search_indices(queries, 10)[1].tolist() == exact_search(queries, gallery, 10)[1].tolist()
    )


def test_an_index_of_other_embeddings_is_one_line_naming_both_files(saved, tmp_path):
    folder, _, _ = saved
    other = tmp_path / "g.npy"
    np.save(other, np.load(folder / "g.npy")[:19_999])
    for name in ("g.index", "g.index.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(DataError) as err:
        open_gallery(other)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'g.index'}: built from embeddings of 20000 x 32")
    assert f"{other} holds 19999 x 32" in message and "bindkit index" in message
    with pytest.raises(ConfigError, match="backend must be one of"):
        open_gallery(other, backend="annoy")


def test_a_damaged_or_missing_index_is_one_line_naming_the_file(saved, tmp_path):
    folder, _, _ = saved
    for name in ("g.npy", "g.index", "g.index.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    raw = (folder / "g.index").read_bytes()
    (tmp_path / "g.index").write_bytes(raw[:1000] + bytes(len(raw) - 1000))  # same size, the lists zeroed
    with pytest.raises(DataError) as err:
        open_gallery(tmp_path / "g.npy")
    assert str(err.value).startswith(f"{tmp_path / 'g.index'}: ") and "\n" not in str(err.value)
    (tmp_path / "g.index").write_bytes(b"IwFl" + bytes(20))  # a foreign header
    with pytest.raises(DataError, match="not a readable FAISS index"):
        open_gallery(tmp_path / "g.npy")
    (tmp_path / "g.index.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="g.index.json: not an index description"):
        open_gallery(tmp_path / "g.npy")
    (tmp_path / "g.index").unlink()
    assert open_gallery(tmp_path / "g.npy").backend == "exact"  # auto: no index, exact search
    with pytest.raises(DataError, match="g.index: not found; build it with `bindkit index"):
        open_gallery(tmp_path / "g.npy", backend="ann")


def test_search_index_refuses_an_index_of_another_gallery(data, saved):
    _, ann, _ = saved
    with pytest.raises(ConfigError, match="approximate index of 20000 x 32 vectors for a gallery of 10 x 32"):
        SearchIndex(data[0][:10], ann=ann)


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.test_bad_input import make_run

    return make_run(tmp_path_factory.mktemp("run"))


def test_cli_index_then_retrieve_uses_the_index(run_dir, tmp_path, capsys):
    from PIL import Image

    from bind.runs import load_run

    gallery, _ = clustered(3000, 16, 2)
    np.save(tmp_path / "g.npy", gallery)
    assert cli(["index", str(tmp_path / "g.npy"), "--recall", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'g.index'}: IVF") and "nprobe=" in out and "per vector" in out
    meta = json.loads((tmp_path / "g.index.json").read_text())
    meta["params"]["nprobe"] = 1  # one cell: the index's top 50 differs from the exact top 50
    (tmp_path / "g.index.json").write_text(json.dumps(meta))
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(tmp_path / "q.png")
    model, _ = load_run(run_dir)
    query = model.embed("image", [str(tmp_path / "q.png")]).numpy()
    found = {}
    for backend in ("auto", "exact"):
        args = ["retrieve", str(run_dir), "--query-modality", "image", "--query", str(tmp_path / "q.png")]
        args += ["--gallery-modality", "image", "--gallery-embeddings", str(tmp_path / "g.npy"), "--top-k", "50"]
        assert cli([*args, "--json", "--backend", backend]) == 0
        found[backend] = [int(r["item"]) for r in json.loads(capsys.readouterr().out)[0]["results"]]
    approximate = open_gallery(tmp_path / "g.npy").search_indices(query, 50)[1][0]
    assert found["auto"] == [i for i in approximate.tolist() if i >= 0]
    assert found["exact"] == exact_search(query, gallery, 50)[1][0].tolist() != found["auto"]


def test_the_benchmark_reports_the_approximate_index_on_both_galleries():
    from bind.bench.retrieval import bench_retrieval

    result = bench_retrieval(gallery_size=6000, dim=16, queries=64, repeats=1, sort_queries=2)
    for data in ("clustered", "uniform"):
        figures = result["ann"][data]
        assert figures["factory"].startswith("IVF") and 0 <= figures["recall_at_10"] <= 1
        assert figures["speedup"] > 0 and figures["build_seconds"] > 0
        assert 16 * 4 < figures["bytes_per_vector"] < 16 * 4 + 64  # the vectors, their ids, the centroids
    assert result["ann_recall_at_10"] == result["ann"]["clustered"]["recall_at_10"] >= 0.9
    assert result["ann_factory"] == result["ann"]["clustered"]["factory"]
