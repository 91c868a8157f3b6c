"""lilt.baselines: the closed-form ridge map between frozen feature spaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lilt.baselines import RidgeMap, fit_ridge, ridge_retrieval
from lilt.eval.retrieval import EmbeddedPairs


def _pairs(n: int, seed: int, weight: torch.Tensor, noise: float = 0.05) -> EmbeddedPairs:
    """Images x and two captions each, y = x @ weight + noise: the answer is known."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, weight.shape[0], generator=g) * 3 + 1  # off-centre and scaled: standardization matters
    text_image = torch.arange(n).repeat_interleave(2)
    y = x[text_image] @ weight + noise * torch.randn(2 * n, weight.shape[1], generator=g)
    return EmbeddedPairs(x, y, text_image, ["en", "sw"] * n, 0)


def test_ridge_recovers_a_known_linear_map() -> None:
    weight = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    ridge = RidgeMap.fit(x, x @ weight, alpha=1e-6)
    probe = torch.randn(7, 12)
    torch.testing.assert_close(ridge(probe), probe @ weight, atol=1e-3, rtol=1e-3)
    shrunk = RidgeMap.fit(x, x @ weight, alpha=1e4)  # heavy regularization pulls the map toward zero
    assert shrunk.weight.norm() < 0.5 * ridge.weight.norm()


def test_fit_ridge_retrieves_held_out_pairs_and_picks_alpha_on_validation() -> None:
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    train, val, test = (_pairs(n, seed, weight) for n, seed in ((200, 4), (60, 5), (80, 6)))
    alphas = (1e-3, 1.0, 1e6)
    ridge = fit_ridge(train, alphas=alphas, val=val)
    scores = [ridge_retrieval(fit_ridge(train, alphas=(a,)), val)["all"]["mean_recall"] for a in alphas]
    assert scores[alphas.index(ridge.alpha)] == max(scores)
    metrics = ridge_retrieval(ridge, test)
    assert metrics["all"]["i2t/R@1"] > 95 and metrics["all"]["t2i/R@1"] > 45  # two captions tie per image
    assert set(metrics) == {"all", "en", "sw"}
    chance = ridge_retrieval(RidgeMap(torch.randn(16, 8), torch.zeros(16), torch.ones(16), torch.zeros(8), 0.0), test)
    assert chance["all"]["i2t/R@1"] < 30
    assert F.normalize(ridge(test.images), dim=-1).shape == (80, 8)
