"""compile_tower: each tower compiled in a dynamo cache of its own, its batch size dynamic, GradCache's no-grad pass
and replay both compiled; the plain ``torch.compile(encoder)`` of three towers runs past dynamo's recompile limit.

CPU, backend "eager": caches, guards and recompiles are dynamo's, the same whichever backend turns its graphs into
kernels, so what is counted here is what a GPU run with inductor meets."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from bind import create_encoder
from bind.encoder import ClipBatch, ModalityEncoder
from bind.train import compile as compile_module
from bind.train.compile import GRAPHS_PER_TOWER, compile_tower
from bind.train.gradcache import ChunkedEmbedding
from encoders.imagebind import tiny_config

SIZES = (3, 6, 7, 10)  # chunks of 4: [3], [4, 2], [4, 3], [4, 4, 2]: five sizes, none of one (dynamo's 0/1 rule)
CHUNK = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test starts from empty caches: dynamo's live on code objects, shared by the whole test process."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def dynamo_warnings() -> Iterator[list[logging.LogRecord]]:
    """The warnings dynamo logs meanwhile (torch's loggers do not reach pytest's caplog at the root)."""
    handler, logger = _Records(), logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def limit_hits(records: list[logging.LogRecord]) -> list[str]:
    """Dynamo's "hit config.recompile_limit (8)" (or accumulated_recompile_limit): from then on, eager."""
    return [r.getMessage() for r in records if "hit config." in r.getMessage() and "recompile_limit" in r.getMessage()]


def towers() -> list[tuple[ModalityEncoder, Callable[[int], object]]]:
    """Three towers whose inputs differ as a model's do: 4-D images, a ClipBatch of 4-D spectrograms, a ClipBatch
    of 5-D video clips (ImageBind's Conv3d stem). Each with a function from a batch size to a batch."""
    torch.manual_seed(0)
    digits = create_encoder("digits_cnn", embed_dim=16, width=4).train()
    audio = create_encoder("audio_vit", n_mels=32, clip_seconds=0.5, width=32, depth=1, heads=2, embed_dim=16)
    video = create_encoder("imagebind_video", config=tiny_config("vision"), clips=2)

    def items(encoder: ModalityEncoder) -> Callable[[int], object]:
        return lambda n: encoder.collate([encoder.preprocess(x) for x in encoder.example_inputs(n, seed=n)])

    images = lambda n: torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))  # noqa: E731
    return [(digits, images), (audio.train(), items(audio)), (video.train(), items(video))]


def gradcache_step(embed: Callable, encoder: ModalityEncoder, batch: object) -> tuple[torch.Tensor, dict]:
    """What a stage does with a large batch: embed it in chunks without a graph, score, replay with a graph.
    Returns the embeddings and the gradients the step leaves on ``encoder``."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    chunked = ChunkedEmbedding(embed, batch, CHUNK)
    target = torch.randn(chunked.embeddings.shape, generator=torch.Generator().manual_seed(2))
    (chunked.embeddings * target).sum().backward()
    chunked.backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    return chunked.embeddings.detach(), grads


def test_plain_torch_compile_of_three_towers_falls_back_to_eager():
    """The bug compile_tower fixes, and proof that limit_hits sees it: one shared code object, ModalityEncoder.forward,
    collects every tower's graphs (per grad mode, input type and rank, first batch size) until dynamo gives up.
    Two batch sizes are enough: 3 towers x 2 grad modes x (the first size, then dynamic) is 12 entries, past 8."""
    with dynamo_warnings() as records:
        for encoder, make in towers():
            compiled = torch.compile(encoder, backend="eager")
            for n in SIZES[:2]:
                gradcache_step(compiled, encoder, make(n))
    hits = limit_hits(records)
    assert hits and "'forward'" in hits[0] and "bind/encoder.py" in hits[0].replace("\\", "/"), hits
    assert counters["unimplemented"], "dynamo recorded no fallback to eager"


def test_compile_tower_one_cache_per_tower_dynamic_batch_same_results(monkeypatch):
    # a limit of 2 entries is what one tower needs (a graph per grad mode) and less than three towers sharing one
    # cache need: it holds only if each tower has its own
    monkeypatch.setattr(compile_module, "GRAPHS_PER_TOWER", 2)
    with dynamo_warnings() as records, torch._dynamo.config.patch(recompile_limit=2):
        for encoder, make in towers():
            tower = compile_tower(encoder, backend="eager")
            graphs = counters["stats"]["unique_graphs"]
            for n in SIZES:
                batch = make(n)
                assert isinstance(batch, ClipBatch) or batch.ndim == 4
                want_z, want_grads = gradcache_step(encoder, encoder, batch)
                got_z, got_grads = gradcache_step(tower, encoder, batch)
                assert got_z.shape == (n, encoder.embed_dim)
                torch.testing.assert_close(got_z, want_z, atol=1e-5, rtol=1e-5)
                assert got_grads.keys() == want_grads.keys()
                assert any(name.startswith("trunk.") for name in got_grads), "no gradient reached the trunk"
                for name, grad in want_grads.items():
                    torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
            assert not limit_hits(records), limit_hits(records)
            # one graph per grad mode (the no-grad pass, the replay), whatever the batch and chunk sizes
            assert counters["stats"]["unique_graphs"] - graphs == 2, type(encoder).__name__
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 6
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_tower_follows_an_encoder_that_overrides_forward():
    """A plugin may define forward itself (here: no normalisation); compile_tower then compiles that, not
    forward_features + embed_features, and still in its own cache with a dynamic batch."""

    class Raw(ModalityEncoder):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(batch))

    torch.manual_seed(0)
    encoder = Raw("pressure", torch.nn.Linear(5, 8), 8, 4)
    tower = compile_tower(encoder, backend="eager")
    for n in (2, 3, 9):
        x = torch.randn(n, 5)
        torch.testing.assert_close(tower(x), encoder(x))
        assert not torch.allclose(tower(x).norm(dim=-1), torch.ones(n))  # not normalised: the override ran
    assert counters["stats"]["unique_graphs"] == 1


def test_a_tower_holds_more_graphs_than_dynamos_limit():
    """Token ids whose length varies, in GradCache chunks down to one item: each grad mode has its graphs for the
    first length, then a dynamic one, and for a chunk of one. compile_tower's budget, not dynamo's, bounds them."""

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.linear = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.linear(self.embedding(ids)).mean(1)

    torch.manual_seed(0)
    encoder = ModalityEncoder("text", Tokens(), 16, 8).train()
    tower = compile_tower(encoder, backend="eager")
    with dynamo_warnings() as records, torch._dynamo.config.patch(recompile_limit=2):
        for n, length in ((5, 7), (6, 9), (9, 11), (5, 12)):  # chunks of 4: [4, 1], [4, 2], [4, 4, 1], [4, 1]
            ids = torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(n))
            want_z, want_grads = gradcache_step(encoder, encoder, ids)
            got_z, got_grads = gradcache_step(tower, encoder, ids)
            torch.testing.assert_close(got_z, want_z)
            for name, grad in want_grads.items():
                torch.testing.assert_close(got_grads[name], grad, msg=name)
    assert not limit_hits(records), limit_hits(records)
    assert 2 < counters["stats"]["unique_graphs"] <= GRAPHS_PER_TOWER


def test_a_recipe_compiled_runs_every_stage_without_reaching_the_recompile_limit(tmp_path, data_root):
    """The digits recipe at smoke size with ``compile: eager`` and GradCache chunks: three stages, four trained
    towers (images, spectrogram clips, video clips, MiniLM's token dicts), chunks of 5, 1, 3 and 2 rows; dynamo
    never gives up (``torch.compile(encoder)`` does here, on ``ModalityEncoder.forward``'s shared cache)."""
    from conftest import DIGITS, SMOKE

    from bind.recipe import load_recipe
    from bind.train.trainer import run_recipe

    overrides = [*SMOKE, f"data_root={data_root}", "compile=eager", "stages.1.batch_size=30", "stages.2.chunk_size=5"]
    overrides += ["modalities.text.freeze=none", "stages.2.pairs.text.batch_size=12"]  # MiniLM trains: token dicts
    with dynamo_warnings() as records:
        results = run_recipe(load_recipe(DIGITS, overrides), tmp_path, show_progress=False)
    assert not limit_hits(records), limit_hits(records)
    assert counters["stats"]["unique_graphs"] >= 3  # the towers did compile
    assert all(math.isfinite(r["accuracy"]) for r in results["zero_shot"].values())
