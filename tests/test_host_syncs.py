"""The training step reads one value back from the device per optimizer step (whether to update).

Every ``.item()``, ``float(tensor)`` or ``bool(tensor)`` on a CUDA tensor makes the host wait for the GPU to
finish all queued work; each becomes ``aten._local_scalar_dense`` in the dispatcher, which a
``TorchDispatchMode`` sees on the CPU too. open_clip reads its losses on log steps only."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bind.bench.ddp import check_recipe
from bind.data import build_dataset
from bind.recipe import parse_recipe
from bind.train.stage import StageRunner
from bind.train.trainer import build_model, seed_everything

# what makes the host wait for the GPU: a value copied to Python, or an output whose size depends on the values
SYNCING = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.repeat_interleave.Tensor,  # without output_size
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}


class CountScalarReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the GPU on CUDA (:data:`SYNCING`), except those inside
    ``torch.optim``: AdamW keeps its step counts on the CPU on purpose (unless fused or capturable), so reading
    them waits for no device; on the CPU they would look like syncs here."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING and not _inside_torch_optim():
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inside_torch_optim() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if f"{os.sep}torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def two_pair_runner(data_root, device: str = "cpu", recipe_keys: dict | None = None, **stage_keys) -> StageRunner:
    """A bind stage with two pairs: a small audio transformer trained end to end, and MiniLM's head on its cached
    trunk features, both against a frozen image anchor."""
    data = check_recipe(str(data_root), 8, local_loss=False, chunk_size=None)
    data |= {"device": device, **(recipe_keys or {})}
    data["modalities"]["text"] = {
        "encoder": "minilm",
        "freeze": "trunk",
        "train_data": {"source": "digit_captions", "split": "train"},
    }
    data["stages"][0]["pairs"]["text"] = {"batch_size": 8}
    data["stages"][0] |= stage_keys
    recipe = parse_recipe(data)
    seed_everything(0)
    model = build_model(recipe)
    train_sets = {m: build_dataset(s.train_data, recipe.data_root) for m, s in recipe.modalities.items()}
    runner = StageRunner(model.to(device), recipe, recipe.stages[0], torch.device(device), train_sets)
    model.train()
    return runner


@pytest.mark.parametrize(
    "stage_keys",
    [{}, {"optimizer": {"grad_clip": 1.0}}, {"chunk_size": 4}, {"optimizer": {"grad_accum_steps": 2}}],
    ids=["plain", "grad_clip", "gradcache", "grad_accum"],
)
def test_a_training_step_reads_one_value_from_the_device(data_root, stage_keys):
    runner = two_pair_runner(data_root, **stage_keys)
    iterators = runner.data.iterators()
    steps = 3
    # the batches are read first: the loaders' own reads (labels of items) are not the step's
    batches = [{m: next(it) for m, it in iterators.items()} for _ in range(steps * 2)]
    ready = {m: iter([b[m] for b in batches]) for m in iterators}
    counts = []
    for _ in range(steps):
        with CountScalarReads() as counter:
            result = runner.train_step(ready)
        counts.append((counter.count, counter.ops))
    assert result.stepped and set(result.parts) == {"audio", "text"} and "text" in runner.caches
    # the NaN/inf decision; the loss waits on the device for a log step
    assert counts == [(1, ["aten._local_scalar_dense.default"])] * steps
    loss, parts, grad_norm = result.scalars()  # what a log step reads, in one transfer
    if "optimizer" not in stage_keys or "grad_clip" in stage_keys["optimizer"]:  # one micro-batch: the pairs' sum
        assert loss == pytest.approx(parts["audio"] + parts["text"], rel=1e-6)
    assert grad_norm > 0


def test_a_clip_batch_is_pinned_by_the_dataloader_and_copied_without_blocking(monkeypatch):
    """Pageable host memory makes a copy to CUDA synchronous. The DataLoader pins what has a ``pin_memory``
    method (a BindBatch is a tuple: its fields are walked), and ``to(non_blocking=True)`` reaches every tensor."""
    from torch.overrides import TorchFunctionMode
    from torch.utils.data._utils.pin_memory import pin_memory

    from bind.encoder import ClipBatch
    from bind.train.batch import BindBatch

    pinned = []

    def fake_pin(self, *args, **kwargs):  # no CUDA here: record what would be pinned
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    clips = ClipBatch({"mel": torch.randn(5, 2, 3)}, torch.tensor([0, 0, 1, 2, 2]), 3)
    batch = pin_memory(BindBatch(torch.randn(3, 4), clips, torch.arange(3), []))
    assert isinstance(batch, BindBatch) and isinstance(batch.inputs, ClipBatch) and batch.inputs.num_items == 3
    assert any(t is clips.clips["mel"] for t in pinned) and any(t is clips.item_index for t in pinned)
    assert torch.equal(batch.inputs.item_index, clips.item_index)

    class Copies(TorchFunctionMode):
        blocking = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and not (kwargs or {}).get("non_blocking"):
                Copies.blocking += 1
            return func(*args, **(kwargs or {}))

    with Copies():
        clips.to("cpu", non_blocking=True)
    assert Copies.blocking == 0
