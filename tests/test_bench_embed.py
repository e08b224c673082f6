"""``bindkit bench embed``: its plumbing and the reference it compares with (figures come from the benchmark)."""

from __future__ import annotations

import pytest

from bind.bench.embed import bench_embed, docstring_sentences


def test_the_corpus_is_real_sentences_of_every_length_the_same_each_time():
    sentences = docstring_sentences(500)
    assert len(sentences) == 500 and sentences == docstring_sentences(500)
    assert all(len(s.split()) >= 3 for s in sentences)
    lengths = sorted(len(s) for s in sentences)
    assert lengths[0] < 40 and lengths[-1] > 200  # short and long: what sorting by length is for


def test_minilm_encodes_what_sentence_transformers_encodes_from_the_same_weights():
    pytest.importorskip("sentence_transformers")
    result = bench_embed(items=64, batch_size=16, repeats=1)
    assert result["items"] == 64 and result["max_length"] == 256  # sentence-transformers' max_seq_length
    assert result["max_abs_difference"] < 1e-5  # the same unit rows (float32 rounding)
    assert result["items_per_s"] > 0 and result["forward_fraction"] > 0 and result["vs_sentence_transformers"] > 0
