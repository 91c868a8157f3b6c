"""lilt.baselines: the closed-form ridge map between frozen feature spaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lilt
from lilt.baselines import (REVERSE_WEIGHTS, KernelRidgeMap, RidgeMap, TwoWayMap, fit_ridge, heads_from_ridge,
                            map_choices, ridge_retrieval)
from lilt.eval.retrieval import EmbeddedPairs, retrieval_by_lang


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


def _nonlinear_pairs(n: int, seed: int) -> EmbeddedPairs:
    """Images and one caption each whose features are a nonlinear function of the image's: no linear map fits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 2 + 1
    y = torch.stack([torch.sin(2 * x[:, 0]), x[:, 1] * x[:, 2], torch.cos(x[:, 3]), (x[:, 4] > 1).float(),
                     torch.tanh(x[:, 5] * x[:, 0])], 1) + 0.05 * torch.randn(n, 5, generator=g)
    return EmbeddedPairs(x, y, torch.arange(n), ["en"] * n, 0)


def test_kernel_ridge_over_distinct_images_is_the_fit_over_their_pairs() -> None:
    g = torch.Generator().manual_seed(7)
    x, counts = torch.randn(30, 8, generator=g) * 2, torch.randint(1, 4, (30,), generator=g)
    rows = torch.arange(30).repeat_interleave(counts)
    y = torch.randn(len(rows), 5, generator=g)  # each pair its own target
    mean_y = torch.zeros(30, 5).index_add_(0, rows, y) / counts[:, None]
    distinct, expanded = KernelRidgeMap.fit(x, mean_y, 0.3, 1.0, counts), KernelRidgeMap.fit(x[rows], y, 0.3, 1.0)
    probe = torch.randn(9, 8, generator=g)
    torch.testing.assert_close(distinct(probe), expanded(probe), atol=1e-5, rtol=1e-5)
    assert len(distinct.support) == 30 and len(expanded.support) == len(rows) > 30
    with pytest.raises(lilt.ConfigError, match="one positive count per input"):
        KernelRidgeMap.fit(x, mean_y, counts=torch.zeros(30))


def test_kernel_ridge_fits_a_nonlinear_map_that_the_linear_one_cannot() -> None:
    train, val, test = _nonlinear_pairs(400, 1), _nonlinear_pairs(100, 2), _nonlinear_pairs(150, 3)
    kernel, linear = fit_ridge(train, val=val, kernel="rbf"), fit_ridge(train, val=val)
    target = F.normalize(test.texts, dim=-1)  # fit_ridge fits the unit caption features
    error = {name: float((m(test.images) - target).pow(2).mean()) for name, m in (("rbf", kernel), ("linear", linear))}
    assert error["rbf"] < 0.7 * error["linear"], error  # about 0.49x here
    recall = {name: ridge_retrieval(m, test)["all"]["mean_recall"] for name, m in (("rbf", kernel),
                                                                                   ("linear", linear))}
    assert recall["rbf"] > recall["linear"] + 10, recall
    # alpha and gamma chosen on validation from the grid given
    grid = [(a, g) for a in (0.01, 1.0) for g in (0.25, 4.0)]
    chosen = fit_ridge(train, alphas=(0.01, 1.0), gammas=(0.25, 4.0), val=val, kernel="rbf")
    scores = {(a, g): ridge_retrieval(fit_ridge(train, alphas=(a,), gammas=(g,), kernel="rbf"), val)["all"][
        "mean_recall"] for a, g in grid}
    assert scores[(chosen.alpha, chosen.gamma)] == max(scores.values())


def test_a_kernel_ridge_too_large_or_unknown_is_a_one_line_error(monkeypatch) -> None:
    train = _nonlinear_pairs(40, 4)
    monkeypatch.setattr(lilt.baselines, "KERNEL_MAX_IMAGES", 30)
    with pytest.raises(lilt.ConfigError, match="distinct training images: 40 > 30; use the 'linear' kernel"):
        fit_ridge(train, kernel="rbf")
    with pytest.raises(lilt.ConfigError, match=r"kernel='poly' is not one of \['linear', 'rbf', 'rbf-two-way'\]"):
        fit_ridge(train, kernel="poly")
    pairs = _pairs(20, 4, torch.randn(8, 5, generator=torch.Generator().manual_seed(3)))  # 20 images, 40 captions
    with pytest.raises(lilt.ConfigError, match="reverse map over the training captions: 40 > 30; use the 'rbf' kernel"):
        fit_ridge(pairs, kernel="rbf-two-way")


def test_the_kernel_and_tower_names_agree_in_the_library_the_recipe_and_the_cli() -> None:
    from typing import get_args, get_type_hints

    from lilt.cli import build_parser
    from lilt.eval.ensemble import TOWERS
    from lilt.recipe import EvalConfig

    actions = build_parser()._subparsers._group_actions[0].choices["eval"]._actions
    for dest, names in (("ridge_kernel", lilt.baselines.KERNELS), ("ridge_towers", TOWERS)):
        assert get_args(get_type_hints(EvalConfig)[dest]) == names
        assert tuple(next(a for a in actions if a.dest == dest).choices) == names


def test_two_way_map_mixes_the_forward_and_reverse_cosines_weighted_on_validation() -> None:
    train, val, test = _nonlinear_pairs(300, 1), _nonlinear_pairs(100, 2), _nonlinear_pairs(120, 3)
    forward, two_way = fit_ridge(train, val=val, kernel="rbf"), fit_ridge(train, val=val, kernel="rbf-two-way")
    assert isinstance(two_way, TwoWayMap) and (two_way.alpha, two_way.gamma) == (forward.alpha, forward.gamma)
    standardized = F.normalize(((test.images.double() - forward.x_mean) / forward.x_scale).float(), dim=-1)
    reverse = standardized @ F.normalize(two_way.reverse(F.normalize(test.texts, dim=-1)), dim=-1).t()
    plain = forward.embed_images(test.images) @ forward.embed_texts(test.texts).t()
    for w in (0.0, 0.3, 1.0):  # one dot product of the concatenated vectors: (1 - w) forward + w reverse
        m = dataclasses.replace(two_way, weight=w)
        torch.testing.assert_close(m.embed_images(test.images) @ m.embed_texts(test.texts).t(),
                                   (1 - w) * plain + w * reverse, atol=1e-5, rtol=1e-5)
    scores = {w: ridge_retrieval(dataclasses.replace(two_way, weight=w), val)["all"]["mean_recall"]
              for w in REVERSE_WEIGHTS}
    assert scores[two_way.weight] == max(scores.values())
    # where captions determine their image (here a linear image of it), the reverse map alone finds it
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    train, val, test = (_pairs(n, seed, weight) for n, seed in ((200, 4), (60, 5), (80, 6)))
    alone = dataclasses.replace(fit_ridge(train, val=val, kernel="rbf-two-way"), weight=1.0)
    assert ridge_retrieval(alone, test)["all"]["t2i/R@1"] > 90  # 80 images: chance is 1.25%
    assert map_choices(two_way) == {"ridge_alpha": forward.alpha, "ridge_gamma": forward.gamma,
                                    "ridge_reverse_alpha": two_way.reverse.alpha,
                                    "ridge_reverse_gamma": two_way.reverse.gamma,
                                    "ridge_reverse_weight": two_way.weight}
    assert set(map_choices(forward)) == {"ridge_alpha", "ridge_gamma"}
    assert set(map_choices(fit_ridge(train))) == {"ridge_alpha"}


def test_heads_from_ridge_refuses_a_kernel_map(make_model) -> None:
    model = make_model("vit")
    width_x, width_y = model.vision_proj.in_features, model.text_proj.in_features
    g = torch.Generator().manual_seed(5)
    kernel = KernelRidgeMap.fit(torch.randn(20, width_x, generator=g), torch.randn(20, width_y, generator=g))
    with pytest.raises(lilt.ConfigError, match="needs a linear RidgeMap; got a KernelRidgeMap"):
        heads_from_ridge(model, kernel, torch.randn(20, width_y, generator=g))


def _head_pairs(model, features: EmbeddedPairs) -> EmbeddedPairs:
    """The features embedded by the model's projection heads (what retrieval with the model compares)."""
    with torch.no_grad():
        images, texts = model.vision_proj(features.images), model.text_proj(features.texts)
    return dataclasses.replace(features, images=F.normalize(images, dim=-1), texts=F.normalize(texts, dim=-1))


def _text_like(pairs: EmbeddedPairs, seed: int, spread: float) -> EmbeddedPairs:
    """Captions moved off-centre along a common direction (as text towers' features are) with norms in
    [3, 3 + spread]: a constant norm (spread 0) makes folding the normalization into the heads exact."""
    g = torch.Generator().manual_seed(seed)
    texts = F.normalize(pairs.texts + 4.0, dim=-1) * (3 + spread * torch.rand(len(pairs.texts), 1, generator=g))
    return dataclasses.replace(pairs, texts=texts)


def test_heads_from_ridge_with_full_width_reproduce_the_ridge_scores(make_model) -> None:
    model = make_model("vit", embed_dim=32)  # embed_dim == the text width (32): nothing is truncated
    weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))
    train, test = (_text_like(_pairs(n, seed, weight, noise=2.0), seed, spread=0.0) for n, seed in ((300, 8), (60, 9)))
    ridge = fit_ridge(train, alphas=(10.0,))
    heads_from_ridge(model, ridge, train.texts)
    heads = _head_pairs(model, test)
    head_scores = heads.images @ heads.texts.t()
    ridge_scores = ridge.embed_images(test.images) @ ridge.embed_texts(test.texts).t()
    assert ridge_scores.std() > 0.1, "the comparison needs scores that differ"
    torch.testing.assert_close(head_scores, ridge_scores, atol=1e-4, rtol=0)


def test_heads_from_ridge_with_fewer_dimensions_retrieve_about_as_well_as_the_ridge(make_model) -> None:
    model = make_model("vit")  # embed_dim 16 < text width 32: heads keep the top 16 principal directions
    g = torch.Generator().manual_seed(10)
    # A map whose singular values decay, so most of the text variance lies in a few directions.
    left, right = (torch.linalg.qr(torch.randn(32, 32, generator=g))[0] for _ in range(2))
    weight = left @ torch.diag(0.85 ** torch.arange(32.0)) @ right.t()
    train, test = (_text_like(_pairs(n, seed, weight, noise=0.7), seed, spread=0.2)
                   for n, seed in ((400, 11), (200, 12)))
    ridge = fit_ridge(train, alphas=(1.0,))
    heads_from_ridge(model, ridge, train.texts)
    got = retrieval_by_lang(_head_pairs(model, test))["all"]
    bar = ridge_retrieval(ridge, test)["all"]
    for key in ("i2t/R@1", "t2i/R@1"):
        assert 50 < bar[key] < 99, "a bar that can be cleared and missed"
        assert got[key] >= bar[key] - 5, (key, got[key], bar[key])
    assert model.vision_proj.weight.dtype == torch.float32 and model.text_proj.bias.shape == (16,)


def test_heads_from_ridge_refuses_heads_without_bias_and_more_dimensions_than_the_text_width(make_model) -> None:
    ridge = RidgeMap.fit(torch.randn(50, 32), torch.randn(50, 32))
    texts = torch.randn(50, 32)
    for options, message in (({"head_bias": False}, r"needs projection heads with a bias \(ModelConfig.head_bias"),
                             ({"embed_dim": 33}, r"embed_dim=33 exceeds the text features' width 32")):
        model = make_model("vit", **options)
        before = model.text_proj.weight.detach().clone()
        with pytest.raises(lilt.ConfigError, match=message) as error:
            lilt.heads_from_ridge(model, ridge, texts)
        assert "\n" not in str(error.value) and torch.equal(model.text_proj.weight, before)
    model = make_model("vit")
    with pytest.raises(lilt.ConfigError, match=r"takes 32-wide image features to 8-wide text features"):
        heads_from_ridge(model, RidgeMap.fit(torch.randn(50, 32), torch.randn(50, 8)), texts)
    with pytest.raises(lilt.ConfigError, match=r"as a \(n, 32\) tensor.*got shape \(0, 32\)"):
        heads_from_ridge(model, ridge, texts[:0])
