"""Retrieval recall@K and the shipped evaluate metrics on hand-built and random scores."""

from __future__ import annotations

import socket

import pytest
import torch

from lilt.eval.metrics import METRICS_DIR, load_metric, retrieval_with_evaluate, shipped_metrics
from lilt.eval.retrieval import recall_at_k

# 3 images x 5 captions; images 0 and 2 have two captions each. Worked by hand:
#   i2t: image 0's best caption (0.6) is beaten by caption 2 (0.7): rank 1. Image 1's caption (0.3) is beaten by
#        0.5 and tied by caption 3: places 2-3 shared, so it is in the top 2 with chance 1/2, never top 1. Image 2's
#        best caption (0.9) is first.  -> R@1 = 1/3, R@2 = (1 + 1/2 + 1)/3 = 5/6.
#   t2i (columns): caption 0 (0.1 vs 0.5) rank 1, caption 1 rank 0, caption 2 (0.3 vs 0.7) rank 1, 3 and 4 rank 0.
#        -> R@1 = 3/5, R@2 = 5/5.
SCORES = [[0.1, 0.6, 0.7, 0.2, 0.0],
          [0.5, 0.1, 0.3, 0.3, 0.2],
          [0.0, 0.2, 0.1, 0.4, 0.9]]
TEXT_IMAGE = [0, 0, 1, 2, 2]
EXPECTED = {"i2t/R@1": 100 / 3, "t2i/R@1": 60.0, "i2t/R@2": 250 / 3, "t2i/R@2": 100.0}


def embeddings_for(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and texts whose dot products are exactly `scores` (one-hot images, texts = score columns)."""
    s = torch.tensor(scores)
    return torch.eye(len(s)), s.t().contiguous()


def random_pairs(n_images: int = 40, n_texts: int = 120, dim: int = 16, seed: int = 0):
    """Normalized embeddings, 1-5 captions per image except image 0, which has none (left out of i2t)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    extra = torch.randint(1, n_images, (n_texts - (n_images - 1),), generator=g)
    text_image = torch.cat([torch.arange(1, n_images), extra])
    texts = torch.nn.functional.normalize(images[text_image] + 1.2 * torch.randn(n_texts, dim, generator=g), dim=-1)
    return images, texts, text_image


@pytest.fixture(scope="module")
def recall_metric():
    """The shipped recall_at_k metric, loaded by path once for the module."""
    return load_metric("recall_at_k", keep_in_memory=True)


@pytest.fixture(scope="module")
def topk_metric():
    """The shipped topk_accuracy metric, loaded by path once for the module."""
    return load_metric("topk_accuracy", keep_in_memory=True)


def test_recall_at_k_hand_built_with_several_captions_and_a_tie():
    images, texts = embeddings_for(SCORES)
    out = recall_at_k(images, texts, torch.tensor(TEXT_IMAGE), k=(1, 2))
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key
    assert out["mean_recall"] == pytest.approx(sum(EXPECTED.values()) / 4, abs=1e-4)


def test_ties_share_the_places_they_span():
    # Documented rule: wrong candidates tied with the positive share the places with it, as a random tie-break
    # would. So a collapsed model (all embeddings equal) scores chance, not 100 (ties won) nor 0 (ties lost).
    images, texts = embeddings_for([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    out = recall_at_k(images, texts, torch.tensor([0, 1, 1]), k=(1, 2))
    assert out["t2i/R@1"] == pytest.approx(50.0) and out["t2i/R@2"] == pytest.approx(100.0)  # 2 images
    # i2t: image 0 has 1 caption among 3 tied (1/3 at R@1); image 1 has 2 among 3 (2/3): on average chance, 1/2.
    assert out["i2t/R@1"] == pytest.approx(50.0)
    metric = load_metric("recall_at_k", keep_in_memory=True)
    assert metric.compute(predictions=[[0.5] * 3, [0.5] * 3], references=[[0], [1, 2]], k=1) == {"R@1": 50.0}
    # Caption 0 ties its own image with image 1: R@1 1/2 for it. Ties among an image's own captions do not
    # count against it (image 1: captions 1 and 2 both 0.9).
    images, texts = embeddings_for([[0.8, 0.2, 0.2], [0.8, 0.9, 0.9]])
    out = recall_at_k(images, texts, torch.tensor([0, 1, 1]), k=(1,))
    assert out["t2i/R@1"] == pytest.approx(100 * 2.5 / 3) and out["i2t/R@1"] == 100.0


def test_strictly_higher_score_outranks_the_positive():
    images, texts = embeddings_for([[0.3, 0.3001], [0.1, 0.9]])  # 1e-4 apart: beyond the 1e-5 tie tolerance
    out = recall_at_k(images, texts, torch.tensor([0, 1]), k=(1,))
    assert out["i2t/R@1"] == 50.0  # image 0: caption 1 scores 0.3001 > 0.3
    assert out["t2i/R@1"] == 100.0  # caption 0: 0.3 vs 0.1; caption 1: 0.9 vs 0.3001


def test_chunked_recall_equals_dense():
    images, texts, text_image = random_pairs()
    dense = recall_at_k(images, texts, text_image, chunk=10**6)
    assert recall_at_k(images, texts, text_image, chunk=2) == dense
    assert 0 < dense["i2t/R@1"] < 100 and 0 < dense["t2i/R@1"] < 100  # neither trivial nor saturated


def test_metric_script_on_hand_built_rows(recall_metric):
    i2t = recall_metric.compute(predictions=SCORES, references=[[0, 1], [2], [3, 4]], k=[1, 2], direction="i2t")
    columns = [list(c) for c in zip(*SCORES)]
    t2i = recall_metric.compute(predictions=columns, references=TEXT_IMAGE, k=[1, 2], direction="t2i")
    for key, value in {**i2t, **t2i}.items():
        assert value == pytest.approx(EXPECTED[key], abs=1e-9), key
    assert recall_metric.compute(predictions=[[0.5, 0.5]], references=[1], k=1) == {"R@1": 50.0}  # a coin flip
    assert recall_metric.compute(predictions=[[0.5, 0.5, 0.1]], references=[[0, 1]], k=1) == {"R@1": 100.0}


def test_metric_script_rejects_bad_references(recall_metric):
    with pytest.raises(ValueError, match="outside its 2 candidates"):
        recall_metric.compute(predictions=[[0.1, 0.2]], references=[2], k=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_metric_matches_recall_at_k(seed):
    images, texts, text_image = random_pairs(seed=seed)
    ours = recall_at_k(images, texts, text_image)
    theirs = retrieval_with_evaluate(images, texts, text_image)
    assert list(theirs) == list(ours)
    # recall_at_k averages in float32 (error ~1e-6); one hit moves a recall by 100/39 here, so this is count-exact.
    for key in ours:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-4), key


def test_topk_accuracy_matches_torch(topk_metric):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 12, generator=g)
    labels = torch.randint(0, 12, (60,), generator=g)
    out = topk_metric.compute(predictions=scores.numpy(), references=labels.tolist(), k=[1, 5])
    for k in (1, 5):
        direct = 100.0 * (scores.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item()
        assert out[f"top{k}"] == pytest.approx(direct, abs=1e-9)
    assert 0 < out["top1"] < out["top5"] < 100


def test_topk_metric_equals_zeroshot_accuracy_including_ties(topk_metric):
    from lilt.eval.zeroshot import topk_accuracy

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 8, generator=g).round(decimals=1)  # one decimal: many ties
    labels = torch.randint(0, 8, (50,), generator=g)
    out = topk_metric.compute(predictions=scores.numpy(), references=labels.tolist(), k=[1, 5])
    direct = topk_accuracy(scores, labels, (1, 5))
    assert out == pytest.approx(direct, abs=1e-9)


def test_unknown_metric_lists_shipped_ones():
    assert shipped_metrics() == ["recall_at_k", "topk_accuracy"]
    with pytest.raises(ValueError, match="recall_at_k, topk_accuracy") as err:
        load_metric("recall@k")
    assert "'recall@k'" in str(err.value) and str(METRICS_DIR) in str(err.value)


def test_loading_by_path_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    metric = load_metric("topk_accuracy", keep_in_memory=True)
    assert metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], k=1) == {"top1": 50.0}
