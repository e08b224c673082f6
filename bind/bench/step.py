"""``bindkit bench step``: the trainer's real step against a bare loop over the same model, loss and optimizer.

For each stage of a recipe (default: the digits recipe), the trainer's :meth:`~bind.train.stage.StageRunner.train_step`
runs ``steps`` steps with its real loaders (workers, augmentation, feature caches), after ``warmup`` steps. Then
``steps`` batches are drawn from the same loaders into memory and a bare loop trains on them: the stage's towers
and loss (:meth:`~bind.train.stage.StageRunner.micro_batch_loss`), ``backward``, ``optimizer.step``. Per stage:

- ``overhead`` = 1 - trainer throughput / bare throughput: what the trainer costs beyond the arithmetic;
- ``data_wait_fraction``: the share of the trainer's time blocked on its loaders (the input pipeline's limit);
- ``preprocess_ms_per_item``: a DataLoader worker's CPU time per item, item by item and batched
  (``preprocess_many``). On a machine with few cores the workers take that time from the training threads,
  so it, not the data wait, is what the overhead is made of.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def bench_step(
    recipe: str = "recipes/digits.yaml",
    steps: int = 20,
    warmup: int = 3,
    data_root: str | None = None,
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Trainer against bare loop, per stage of ``recipe`` (``stages``: only those names; ``overrides``: recipe
    ``key=value`` overrides, e.g. ``["num_workers=2"]``)."""
    from ..data import build_dataset
    from ..distributed import SINGLE_PROCESS, resolve_device
    from ..recipe import load_recipe
    from ..train.malloc import tune_malloc
    from ..train.stage import StageRunner
    from ..train.trainer import configure_backends, prepare_model, seed_everything

    spec = load_recipe(recipe, [*(overrides or []), *([f"data_root={data_root}"] if data_root else [])])
    device = resolve_device(spec.device)
    seed_everything(spec.seed)
    configure_backends(spec.precision, device)
    model = prepare_model(spec, device)  # on the device, as the trainer has it
    train_sets = {m: build_dataset(s.train_data, spec.data_root) for m, s in spec.modalities.items() if s.train_data}
    result: dict[str, Any] = {"recipe": recipe, "overrides": overrides or [], "steps": steps, "device": str(device)}
    result["malloc_tuned"] = tune_malloc()  # what the bindkit command sets (bind/train/malloc.py)
    result["stages"] = {}
    for stage in spec.stages:
        if stages and stage.name not in stages:
            continue
        runner = StageRunner(model, spec, stage, device, train_sets, SINGLE_PROCESS, show_progress=False)
        model.train()
        iterators = runner.data.iterators()
        for _ in range(warmup):
            runner.train_step(iterators)
        data_s, start = 0.0, time.perf_counter()
        samples = 0
        for _ in range(steps):
            step = runner.train_step(iterators)
            data_s += step.data_s
            samples += step.samples
        trainer_s = time.perf_counter() - start
        accum = stage.optimizer.grad_accum_steps
        batches = [[{m: next(it) for m, it in iterators.items()} for _ in range(accum)] for _ in range(steps)]
        for micro_batches in batches[:warmup]:
            _bare_step(runner, micro_batches)
        start = time.perf_counter()
        for micro_batches in batches:
            _bare_step(runner, micro_batches)
        bare_s = time.perf_counter() - start
        result["stages"][stage.name] = {
            "trainer_samples_per_s": round(samples / trainer_s, 1),
            "bare_samples_per_s": round(samples / bare_s, 1),
            "trainer_step_s": round(trainer_s / steps, 4),
            "bare_step_s": round(bare_s / steps, 4),
            "overhead": round(1 - bare_s / trainer_s, 4),  # target <= 0.10
            "data_wait_fraction": round(data_s / trainer_s, 4),
            "num_workers": spec.num_workers,
            "preprocess_ms_per_item": _preprocess_cost(runner),
        }
    return result


def _preprocess_cost(runner: Any, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per modality of the stage that preprocesses in its loader: the worker's time per item (one thread, as in a
    DataLoader worker; best of ``repeats``) item by item (``Preprocessed.load``) and batched (``load_many``)."""
    from ..data.pairs import Preprocessed
    from . import best_time

    out = {}
    for modality, loader in runner.data.loaders.items():
        dataset = getattr(loader.dataset, "other", loader.dataset)  # AnchorPairs: the paired modality's side
        if not isinstance(dataset, Preprocessed):  # cached features, shard streams
            continue
        keys = [(0, i) for i in range(min(len(dataset), loader.batch_size))]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = best_time(lambda: [dataset.load(*key) for key in keys], repeats)  # noqa: B023
            many = best_time(lambda: dataset.load_many(keys), repeats)  # noqa: B023
        finally:
            torch.set_num_threads(threads)
        out[modality] = {"item_by_item": round(one / len(keys) * 1e3, 3), "batched": round(many / len(keys) * 1e3, 3)}
    return out


def _bare_step(runner: Any, micro_batches: list[dict[str, Any]]) -> None:
    """One optimizer step on batches already in memory: the stage's towers and loss, backward, the update."""
    for batches in micro_batches:
        with runner.autocast():
            loss, _, _, replays = runner.micro_batch_loss(batches)
        (loss / len(micro_batches)).backward()
        for replay in replays:
            replay.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
