"""Evaluation of a bound space: zero-shot classification and class-match retrieval between modalities.

Metrics are exact and deterministic: similarities are computed in blocks of queries, ranks come
from a stable sort (ties go to the lower gallery index).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import Items, build_dataset
from .data.augment import build_augment
from .data.pairs import Preprocessed
from .distributed import SINGLE_PROCESS, Dist
from .encoder import move_to
from .errors import DataError
from .model import BindModel
from .registry import get_encoder_info


@torch.no_grad()
def embed_items(
    model: BindModel,
    modality: str,
    items: Items,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    show_progress: bool = False,
    views: list[Any] | None = None,
) -> Tensor:
    """(N, D) embeddings of a dataset's items, in order.

    ``views`` (fixed augmenters, from an augmenter's ``test_views``): each item's embedding is the normalised mean
    of its embeddings under each view (test-time augmentation)."""
    encoder = model[modality]
    total = None
    for view in views or [None]:
        loader = DataLoader(
            Preprocessed(items, encoder.preprocess, augment=view, preprocess_many=encoder.preprocess_many),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=lambda b: encoder.collate([x for x, _ in b]),
            generator=torch.Generator(),  # leaves the global RNG as it was (exact resume)
        )
        bar = tqdm(loader, desc=f"eval: embed {modality}", unit="batch", disable=not show_progress, leave=False)
        z = torch.cat([encoder(move_to(batch, device)).float().cpu() for batch in bar])
        total = z if total is None else total + z
    return total if views is None else F.normalize(total, dim=-1)


def tta_views(recipe: Any, modality: str) -> list[Any] | None:
    """The fixed views ``eval.tta`` asks for, from the augmenter ``modality`` trains with (its ``test_views``);
    ``None`` when tta is off or the modality trains unaugmented (text, the anchor of a plain recipe)."""
    spec = recipe.modalities[modality]
    if recipe.eval.tta <= 1 or spec.train_data is None or not spec.train_data.augment:
        return None
    augmenter = build_augment(get_encoder_info(spec.encoder), spec.train_data.augment)
    make = getattr(augmenter, "test_views", None)
    return make(recipe.eval.tta) if make is not None else None


def align_labels(items: Items, class_names: list[str] | None, where: str) -> Items:
    """``items`` with labels renumbered to the model's ``class_names`` (what label i meant in training).

    A label matches a class by name, or by number when it is an integer ("7" is class 7). Items without
    class names, or a model without them, keep their labels.
    """
    if not class_names or not items.class_names or list(items.class_names) == list(class_names):
        return items
    index = {name: i for i, name in enumerate(class_names)}
    mapping = []
    for name in items.class_names:
        name = str(name)
        if name in index:
            mapping.append(index[name])
        elif name.lstrip("-").isdigit() and 0 <= int(name) < len(class_names):
            mapping.append(int(name))
        else:
            shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
            raise DataError(
                f"{where}: label {name!r} is not a class of the model (its classes: {shown}); "
                f"use those names, or their numbers 0..{len(class_names) - 1}"
            )
    labels = torch.tensor(mapping, dtype=torch.long)[items.labels]
    return Items(lambda i: items[i], labels, items.names, class_names)


def class_prototypes(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm mean embedding per class (template averaging, as CLIP does with prompts) and the classes."""
    classes = labels.unique()
    protos = torch.stack([embeddings[labels == c].mean(0) for c in classes])
    return F.normalize(protos, dim=-1), classes


def zero_shot_accuracy(queries: Tensor, query_labels: Tensor, prototypes: Tensor, prototype_labels: Tensor) -> float:
    """Share of queries whose most similar prototype has their label."""
    predicted = prototype_labels[(queries @ prototypes.T).argmax(1)]
    return (predicted == query_labels).float().mean().item()


def class_match_retrieval(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Retrieval where a gallery item is relevant when it shares the query's label.

    R@k: share of queries with a relevant item in the top k. Median rank: of the first relevant item
    (1-based). mAP: mean over queries of average precision over the whole ranked gallery.
    """
    hits = {k: 0 for k in ks}
    first_ranks, aps = [], []
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ gallery.T
        order = torch.sort(-sims, dim=1, stable=True).indices  # stable: ties broken by gallery index
        relevant = gallery_labels[order] == query_labels[start : start + block, None]
        for k in ks:
            hits[k] += relevant[:, :k].any(1).sum().item()
        has = relevant.any(1)
        first = relevant.float().argmax(1) + 1
        first_ranks.append(torch.where(has, first.float(), torch.tensor(float("inf"))))
        cum = relevant.float().cumsum(1)
        positions = torch.arange(1, relevant.shape[1] + 1)
        precision_at_hits = (cum / positions) * relevant
        aps.append(precision_at_hits.sum(1) / relevant.sum(1).clamp(min=1))
    n = len(queries)
    result = {f"R@{k}": hits[k] / n for k in ks}
    result["median_rank"] = torch.cat(first_ranks).median().item()
    result["mAP"] = torch.cat(aps).mean().item()
    return result


def embed_items_distributed(
    model: BindModel,
    modality: str,
    items: Items,
    device: torch.device,
    dist: Dist,
    num_workers: int = 0,
    show_progress: bool = False,
    views: list[Any] | None = None,
) -> Tensor:
    """:func:`embed_items` with the items split over ranks in contiguous shards, gathered back in order."""
    if not dist.enabled:
        return embed_items(
            model, modality, items, device, num_workers=num_workers, show_progress=show_progress, views=views
        )
    bounds = [len(items) * r // dist.world_size for r in range(dist.world_size + 1)]
    shard = items.subset(range(bounds[dist.rank], bounds[dist.rank + 1]))
    mine = embed_items(model, modality, shard, device, num_workers=num_workers, views=views) if len(shard) else None
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, mine)
    return torch.cat([part for part in parts if part is not None])


def embed_eval_splits(
    model: BindModel,
    recipe: Any,
    device: torch.device,
    dist: Dist = SINGLE_PROCESS,
    show_progress: bool = False,
    data: dict[str, Any] | None = None,
    set_name: str = "",
) -> dict[str, tuple[Tensor, Items]]:
    """Embeddings and items of every modality's eval split (capped at ``eval.max_items``, spread over the split).

    ``data`` (modality -> DataSpec) embeds those modalities' data instead (``eval.sets[set_name]``) and only them.
    Under torchrun each rank embeds its shard; every rank gets all embeddings, in item order."""
    specs = data if data is not None else {m: s.eval_data for m, s in recipe.modalities.items()}
    out = {}
    for modality, spec in specs.items():
        if spec is None:
            continue
        items = build_dataset(spec, recipe.data_root)
        where = f"eval.sets.{set_name}.{modality}" if data is not None else f"modalities.{modality}.eval_data"
        items = align_labels(items, model.class_names, where)
        cap = recipe.eval.max_items
        if cap is not None and len(items) > cap:
            step = len(items) / cap  # every class stays represented
            items = items.subset([int(i * step) for i in range(cap)])
        views = tta_views(recipe, modality)
        embeddings = embed_items_distributed(
            model, modality, items, device, dist, recipe.num_workers, show_progress and dist.is_main, views
        )
        out[modality] = (embeddings, items)
    return out


def evaluate_all(
    model: BindModel, recipe: Any, device: torch.device, dist: Dist = SINGLE_PROCESS, show_progress: bool = False
) -> dict[str, Any]:
    """:func:`evaluate_model` on the eval splits, and on each of ``eval.sets`` (under ``"sets"``): a set's
    modalities are embedded from its data, the others' embeddings are reused."""
    splits = embed_eval_splits(model, recipe, device, dist, show_progress)
    results = evaluate_model(model, recipe, device, splits)
    if recipe.eval.sets:
        results["sets"] = {
            name: evaluate_model(
                model,
                recipe,
                device,
                splits | embed_eval_splits(model, recipe, device, dist, show_progress, data, name),
            )
            for name, data in recipe.eval.sets.items()
        }
    return results


def evaluate_model(
    model: BindModel, recipe: Any, device: torch.device, splits: dict[str, tuple[Tensor, Items]] | None = None
) -> dict[str, Any]:
    """Zero-shot accuracy per modality and class-match retrieval for each ordered pair of modalities."""
    splits = splits if splits is not None else embed_eval_splits(model, recipe, device)
    trained = {frozenset((recipe.anchor_modality, m)) for s in recipe.stages if s.kind == "bind" for m in s.pairs}
    embeddings = {m: e for m, (e, _) in splits.items()}
    labels = {m: items.labels for m, (_, items) in splits.items()}
    prompt = prompt_modality(model, recipe)
    results: dict[str, Any] = {"prompt_modality": prompt, "zero_shot": {}, "retrieval": {}}
    if prompt in embeddings:
        protos, proto_labels = class_prototypes(embeddings[prompt], labels[prompt])
        for modality in embeddings:
            if modality != prompt:
                kind = "trained" if frozenset((modality, prompt)) in trained else "emergent"
                acc = zero_shot_accuracy(embeddings[modality], labels[modality], protos, proto_labels)
                results["zero_shot"][modality] = {"accuracy": acc, "pair": kind}
    for a, b in itertools.permutations(embeddings, 2):  # the binding matrix, anchor and prompts included
        metrics = class_match_retrieval(embeddings[a], labels[a], embeddings[b], labels[b])
        metrics["pair"] = "trained" if frozenset((a, b)) in trained else "emergent"
        results["retrieval"][f"{a}->{b}"] = metrics
    return results


def prompt_modality(model: BindModel, recipe: Any) -> str | None:
    """The modality whose eval items are the zero-shot prompts: the recipe's ``eval.prompt_modality``, else the one
    modality whose encoder reads text (``takes_text``); ``None`` (no zero-shot) when there is none or several."""
    if recipe.eval.prompt_modality is not None:
        return recipe.eval.prompt_modality
    readers = [m for m, encoder in model.encoders.items() if encoder.takes_text]
    return readers[0] if len(readers) == 1 else None


def format_results(results: dict[str, Any]) -> str:
    """A small readable table of :func:`evaluate_model`'s results."""
    lines = []
    prompt = results.get("prompt_modality")
    if results["zero_shot"]:
        lines.append(f"zero-shot classification against {prompt} prompts:")
    for modality, r in results["zero_shot"].items():
        lines.append(f"  {modality + '->' + prompt:<16} acc {r['accuracy']:.3f}  ({r['pair']})")
    if results["retrieval"]:
        lines.append("class-match retrieval:")
        for pair, r in results["retrieval"].items():
            lines.append(
                f"  {pair:<16} R@1 {r['R@1']:.3f}  R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}  "
                f"MdR {r['median_rank']:g}  mAP {r['mAP']:.3f}  ({r['pair']})"
            )
    for name, set_results in results.get("sets", {}).items():
        lines += ["", f"eval set {name}:", *("  " + line for line in format_results(set_results).splitlines())]
    return "\n".join(lines)
