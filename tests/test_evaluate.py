"""Retrieval and zero-shot metrics against small cases computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bind.evaluate import class_match_retrieval, class_prototypes, zero_shot_accuracy


def test_class_match_retrieval_hand_computed():
    # gallery on a line of angles; queries pick a known order
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    gallery_labels = torch.tensor([0, 1, 2, 1])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query_labels = torch.tensor([1, 2])
    # query 0 ranks gallery: 0 (1.0), 3 (0.6), 1 (0.0), 2 (-1.0) -> relevant (label 1) at ranks 2, 3
    # query 1 ranks gallery: 1 (1.0), 3 (0.8), 0 (0.0), 2 (0.0; tie -> lower index first) -> label 2 at rank 4
    m = class_match_retrieval(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 4))
    assert m["R@1"] == 0.0
    assert m["R@2"] == 0.5
    assert m["R@4"] == 1.0
    assert m["median_rank"] == 2.0  # torch median of [2, 4] is the lower middle
    ap0 = (1 / 2 + 2 / 3) / 2
    ap1 = 1 / 4
    assert m["mAP"] == pytest.approx((ap0 + ap1) / 2)


def test_ties_are_broken_by_gallery_index():
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    first = class_match_retrieval(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), gallery, torch.tensor([0, 1]), ks=(1,))
    second = class_match_retrieval(
        torch.tensor([[1.0, 0.0]]), torch.tensor([1]), gallery, torch.tensor([0, 1]), ks=(1,)
    )
    assert (first["R@1"], second["R@1"]) == (1.0, 0.0)


def reference_retrieval(queries, query_labels, gallery, gallery_labels, ks):
    """The metrics one query at a time, from their definitions: the gallery ranked by a stable sort of the scores."""
    recall, first_ranks, aps = dict.fromkeys(ks, 0), [], []
    for query, label in zip(queries.tolist(), query_labels.tolist(), strict=True):
        scores = np.asarray(gallery.tolist()) @ np.asarray(query)
        ranked = np.argsort(-scores, kind="stable")
        hit_ranks = [rank for rank, j in enumerate(ranked, start=1) if gallery_labels[j] == label]
        for k in ks:
            recall[k] += bool(hit_ranks) and hit_ranks[0] <= k
        first_ranks.append(hit_ranks[0] if hit_ranks else math.inf)
        aps.append(sum(n / rank for n, rank in enumerate(hit_ranks, start=1)) / max(1, len(hit_ranks)))
    result = {f"R@{k}": recall[k] / len(queries) for k in ks}
    result["median_rank"] = sorted(first_ranks)[(len(first_ranks) - 1) // 2]  # the lower middle, as torch's median
    result["mAP"] = sum(aps) / len(aps)
    return result


@pytest.mark.parametrize("block", [1, 3, 5, 1024])
def test_retrieval_in_blocks_of_queries_matches_one_query_at_a_time(block):
    """Every block of queries is scored against its own labels: 12 queries in blocks of 1, 3 (four full blocks),
    5 (a short last one) and one block; integer embeddings, so scores are exact and ties are frequent."""
    g = torch.Generator().manual_seed(2)
    queries, gallery = (
        torch.randint(-2, 3, (12, 3), generator=g).float(),
        torch.randint(-2, 3, (30, 3), generator=g).float(),
    )
    query_labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 4])  # 4: no relevant item in the gallery
    gallery_labels = torch.randint(0, 4, (30,), generator=g)
    expected = reference_retrieval(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 5))
    assert 0 < expected["R@1"] < expected["R@5"] < 1  # the queries differ: labels mixed up between blocks would show
    got = class_match_retrieval(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 5), block=block)
    assert got == pytest.approx(expected, rel=1e-6)


def test_zero_shot_against_template_averaged_prototypes():
    prompts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    protos, classes = class_prototypes(prompts, torch.tensor([3, 3, 5, 5]))
    assert classes.tolist() == [3, 5]
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(2))
    queries = torch.tensor([[0.9, 0.2], [0.2, 0.9], [0.8, -0.1]])
    assert zero_shot_accuracy(queries, torch.tensor([3, 5, 5]), protos, classes) == pytest.approx(2 / 3)


def test_eval_sets_embed_only_their_modalities_and_reuse_the_others(tiny_run):
    """The digits recipe's eval.sets.rescaled replaces image and video data; audio and text are the same items,
    so their figures are the eval split's exactly, and the prompts (text) are shared."""
    results = json.loads((tiny_run / "eval.json").read_text())
    rescaled = results["sets"]["rescaled"]
    assert set(rescaled["zero_shot"]) == set(results["zero_shot"]) == {"image", "audio", "video"}
    assert rescaled["zero_shot"]["audio"] == results["zero_shot"]["audio"]
    assert rescaled["retrieval"]["audio->text"] == results["retrieval"]["audio->text"]
    assert rescaled["retrieval"]["image->audio"] != results["retrieval"]["image->audio"]  # other images


def test_tta_averages_the_augmented_towers_views_only(tiny_run):
    """eval.tta=3: the towers trained with an augmenter get its three fixed views; text (no augmenter) none."""
    from bind.evaluate import evaluate_all, tta_views
    from bind.recipe import parse_recipe, recipe_to_dict
    from bind.runs import load_run

    model, recipe = load_run(tiny_run)
    data = recipe_to_dict(recipe)
    data["eval"] |= {"tta": 3, "sets": {}}
    recipe = parse_recipe(data, "tta", check_data=False)
    assert tta_views(recipe, "text") is None
    assert [len(tta_views(recipe, m)) for m in ("image", "audio", "video")] == [3, 3, 3]
    with_tta = evaluate_all(model, recipe, torch.device("cpu"))
    plain = json.loads((tiny_run / "eval.json").read_text())
    for pair in ("audio->image", "image->video", "video->text"):
        assert with_tta["retrieval"][pair] != plain["retrieval"][pair]
