"""Embedding a corpus (bind/corpus.py, `bindkit embed`): rows on disk as they come, resumable, split over ranks.

The reference for every row is ``BindModel.encode`` of the same items in the same batches (itself checked against
item-by-item embedding in test_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bind import BindModel, DataError, InputError, create_encoder
from bind.cli import main
from bind.corpus import Partial, embed_corpus
from bind.inputs import names_path


@pytest.fixture(scope="module")
def model() -> BindModel:
    torch.manual_seed(0)
    return BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=16)}, "image").eval()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[str]:
    """21 small PNGs of different content: 21 = 5 batches of 4 and one of 1, chunks of 8 = 2 full and one short."""
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(21):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def reference(model: BindModel, items: list[str]) -> np.ndarray:
    return model.encode("image", items, batch_size=4, show_progress_bar=False, num_workers=0)


def test_rows_and_names_equal_encode_in_input_order(model, pngs, tmp_path):
    out = embed_corpus(model["image"], pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    assert out == tmp_path / "g.npy"
    rows = np.load(out, allow_pickle=False)
    assert rows.dtype == np.float32 and rows.shape == (21, 16)
    np.testing.assert_allclose(rows, reference(model, pngs), atol=1e-6)
    assert names_path(out).read_text().splitlines() == pngs
    assert not (tmp_path / "g.npy.partial").exists()  # finished: the working folder is gone


def test_reader_processes_give_the_same_rows(model, pngs, tmp_path):
    out = embed_corpus(model["image"], pngs, tmp_path / "g.npy", batch_size=4, workers=2, show_progress=False)
    np.testing.assert_allclose(np.load(out), reference(model, pngs), atol=1e-6)


class Killed(Exception):
    pass


def test_an_interrupted_embed_resumes_at_the_first_unfinished_chunk(model, pngs, tmp_path, monkeypatch):
    write_chunk = Partial.write_chunk
    written: list[int] = []

    def die_after_one(self, chunk, rows):
        if written:
            raise Killed  # as a kill between two chunks
        write_chunk(self, chunk, rows)
        written.append(chunk)

    monkeypatch.setattr(Partial, "write_chunk", die_after_one)
    with pytest.raises(Killed):
        embed_corpus(model["image"], pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    assert not (tmp_path / "g.npy").exists()
    assert (tmp_path / "g.npy.partial" / "done").read_bytes() == b"\1\0\0"
    monkeypatch.setattr(Partial, "write_chunk", write_chunk)

    seen: list[int] = []
    encoder = model["image"]
    hook = encoder.register_forward_hook(lambda module, args, z: seen.append(len(z)))
    try:
        out = embed_corpus(encoder, pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    finally:
        hook.remove()
    assert sum(seen) == 21 - 8  # the first chunk was not embedded again
    np.testing.assert_allclose(np.load(out), reference(model, pngs), atol=1e-6)


def test_a_partial_of_other_inputs_is_refused_not_overwritten(model, pngs, tmp_path, monkeypatch):
    monkeypatch.setattr(Partial, "write_chunk", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        embed_corpus(model["image"], pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    meta = (tmp_path / "g.npy.partial" / "meta.json").read_bytes()
    with pytest.raises(DataError, match=r"g\.npy\.partial: a partial embedding of other items_sha256, rows") as err:
        embed_corpus(model["image"], pngs[:-1], tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    assert "\n" not in str(err.value)
    other = BindModel({"image": create_encoder("digits_cnn", width=4, embed_dim=16)}, "image")  # other weights
    with pytest.raises(DataError, match="other model than"):
        embed_corpus(other["image"], pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    assert (tmp_path / "g.npy.partial" / "meta.json").read_bytes() == meta


def test_ranks_write_disjoint_chunks_and_the_last_one_finishes(model, pngs, tmp_path):
    kwargs = dict(batch_size=4, chunk_items=8, show_progress=False)
    assert embed_corpus(model["image"], pngs, tmp_path / "g.npy", rank=1, world_size=2, **kwargs) is None
    assert (tmp_path / "g.npy.partial" / "done").read_bytes() == b"\0\1\0"  # chunk 1 is rank 1's
    assert not (tmp_path / "g.npy").exists()
    out = embed_corpus(model["image"], pngs, tmp_path / "g.npy", rank=0, world_size=2, **kwargs)
    np.testing.assert_allclose(np.load(out), reference(model, pngs), atol=1e-6)


def test_a_full_disk_is_one_line_and_keeps_the_chunks_before_it(model, pngs, tmp_path, monkeypatch):
    import bind.corpus

    real = bind.corpus._write_at
    calls = {"n": 0}

    def full_disk(path, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:  # the second chunk's rows: the first chunk's rows and mark are written
            raise OSError(28, "No space left on device")
        real(path, data, offset)

    monkeypatch.setattr(bind.corpus, "_write_at", full_disk)
    with pytest.raises(DataError, match=r"g\.npy: not written, nor .*g\.names\.txt: No space left on device") as err:
        embed_corpus(model["image"], pngs, tmp_path / "g.npy", batch_size=4, chunk_items=8, show_progress=False)
    assert str(err.value).endswith("g.npy.partial: run the same command again to resume")
    assert (tmp_path / "g.npy.partial" / "done").read_bytes() == b"\1\0\0"


def test_a_corrupt_file_read_by_a_worker_is_its_own_one_line_error(model, pngs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = [*pngs[:9], str(bad), *pngs[9:]]
    with pytest.raises(InputError, match="corrupt or not an image") as err:  # the decoder's own error, unwrapped
        embed_corpus(model["image"], items, tmp_path / "g.npy", batch_size=4, workers=1, show_progress=False)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "m")


def bindkit(*args) -> int:
    """The exit status of ``bindkit ARGS``, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_cli_nproc_manifest_and_shards_give_the_rows_of_plain_inputs(saved, pngs, tmp_path, model):
    from bind.data.shard_writer import write_shards

    want = reference(model, pngs)
    args = ["embed", str(saved), "--modality", "image", "--batch-size", "4"]
    assert bindkit(*args, "--out", str(tmp_path / "plain.npy"), *pngs) == 0
    np.testing.assert_allclose(np.load(tmp_path / "plain.npy"), want, atol=1e-6)

    assert bindkit(*args, *pngs, "--out", str(tmp_path / "two.npy"), "--nproc", "2") == 0  # inputs after options
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), want, atol=1e-6)
    assert names_path(tmp_path / "two.npy").read_text().splitlines() == pngs

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"photo": p, "label": str(i % 3)}) + "\n" for i, p in enumerate(pngs)))
    assert bindkit(*args, "--manifest", str(manifest), "--column", "photo", "--out", str(tmp_path / "man.npy")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "man.npy"), want, atol=1e-6)

    write_shards(manifest, tmp_path / "shards", samples_per_shard=8)
    assert (
        bindkit(*args, "--shards", str(tmp_path / "shards"), "--column", "photo", "--out", str(tmp_path / "sh.npy"))
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "sh.npy"), want, atol=1e-6)
    names = names_path(tmp_path / "sh.npy").read_text().splitlines()
    assert names[0] == "shard-000000.tar/000000" and len(names) == 21


def test_cli_refuses_two_sources_and_column_without_one(saved, pngs, tmp_path, capsys):
    base = ["embed", str(saved), "--modality", "image", "--out", str(tmp_path / "g.npy")]
    assert bindkit(*base, pngs[0], "--manifest", str(tmp_path / "m.csv")) == 2
    assert "one of them" in capsys.readouterr().err
    assert bindkit(*base, "--column", "photo", pngs[0]) == 2
    assert "--column: only with --manifest or --shards" in capsys.readouterr().err


def test_cli_under_torchrun_each_rank_embeds_its_chunks_and_the_last_writes_the_pair(
    saved, pngs, tmp_path, model, monkeypatch, capsys
):
    out = tmp_path / "g.npy"
    args = ["embed", saved, "--modality", "image", "--batch-size", "4", "--out", out, *pngs]
    monkeypatch.setattr("bind.corpus.CHUNK_ITEMS", 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert bindkit(*args) == 0
    assert "rank 1: its chunks" in capsys.readouterr().out and not out.exists()
    monkeypatch.setenv("RANK", "0")
    assert bindkit(*args) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 21 x 16 float32 (image)")
    np.testing.assert_allclose(np.load(out), reference(model, pngs), atol=1e-6)
    assert bindkit(*args, "--nproc", "2") == 2  # torchrun already made the processes
