"""The tuned-model + ridge-map ensemble: exact mixed scores, images matched via captions, weight on validation."""

import pytest
import torch
import torch.nn.functional as F

import lilt
from lilt.errors import ConfigError, DataError
from lilt.eval import EmbeddedPairs, retrieval_by_lang
from lilt.eval.ensemble import DEFAULT_WEIGHTS, choose_weight, choose_weight_and_hubness, fit_ridge_ensemble, mix_pairs
from lilt.eval.hubness import HubnessBank, choose_hubness


def _pairs(seed: int, order: torch.Tensor | None = None) -> EmbeddedPairs:
    g = torch.Generator().manual_seed(seed)
    images, texts = torch.randn(5, 6, generator=g), torch.randn(8, 6, generator=g)
    text_image = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    if order is not None:  # the same images listed in another order
        images, text_image = images[order], torch.argsort(order)[text_image]
    return EmbeddedPairs(images, texts, text_image, ["en"] * 5 + ["sw"] * 3, [])


def test_mixed_dot_products_are_the_weighted_cosines_whatever_the_image_order():
    tuned, mapped = _pairs(0), _pairs(1)
    shuffled = _pairs(1, order=torch.tensor([3, 0, 4, 1, 2]))
    mixed = mix_pairs(tuned, shuffled, 0.3)
    cos = F.normalize(tuned.texts, dim=-1) @ F.normalize(tuned.images, dim=-1).t()
    cos_mapped = F.normalize(mapped.texts, dim=-1) @ F.normalize(mapped.images, dim=-1).t()
    assert torch.allclose(mixed.texts @ mixed.images.t(), 0.7 * cos + 0.3 * cos_mapped, atol=1e-6)
    assert retrieval_by_lang(mix_pairs(tuned, shuffled, 0.0)) == retrieval_by_lang(tuned)
    assert retrieval_by_lang(mix_pairs(tuned, shuffled, 1.0))["en"] == retrieval_by_lang(mapped)["en"]


def _noisy(seed: int, truth: torch.Tensor, noise: float) -> EmbeddedPairs:
    """40 images, 2 captions each, in two languages: the truth plus noise on both sides (a hub-prone space)."""
    g = torch.Generator().manual_seed(seed)
    hub = torch.randn(1, truth.shape[1], generator=g)  # a shared direction: hubs
    images = truth + noise * torch.randn(truth.shape, generator=g) + hub
    text_image = torch.arange(2 * len(truth)) % len(truth)
    texts = truth[text_image] + noise * torch.randn(len(text_image), truth.shape[1], generator=g)
    return EmbeddedPairs(images, texts, text_image, ["en"] * len(truth) + ["sw"] * len(truth), [])


def test_weight_and_hubness_are_chosen_together_as_the_grid_argmax():
    g = torch.Generator().manual_seed(0)
    truth = {split: torch.randn(40, 8, generator=g) for split in ("train", "val")}
    tuned = {split: _noisy(1 + i, t, 1.2) for i, (split, t) in enumerate(truth.items())}
    mapped = {split: _noisy(5 + i, t, 1.0) for i, (split, t) in enumerate(truth.items())}
    weight, bank, tried = choose_weight_and_hubness(tuned["train"], tuned["val"], mapped["train"], mapped["val"])
    assert len(tried) == len(DEFAULT_WEIGHTS) * 3 * 5  # 5 weights x k 5, 10, 20 (50 > 40 images) x 5 betas
    grid = {}
    for w in DEFAULT_WEIGHTS:  # brute force: every (w, k, beta) scored on the corrected mixed validation pairs
        mixed = {split: mix_pairs(tuned[split], mapped[split], w) for split in ("train", "val")}
        _, scores = choose_hubness(mixed["train"], mixed["val"])
        grid.update({(w, key): v for key, v in scores.items()})
    best = max(grid, key=grid.__getitem__)
    assert (weight, f"k={bank.k} beta={bank.beta:g}") == best and tried[f"w={weight:g} {best[1]}"] == grid[best]
    # never worse on validation than the weight chosen first, then the correction on that mix
    first, _ = choose_weight(tuned["val"], mapped["val"])
    _, after = choose_hubness(mix_pairs(tuned["train"], mapped["train"], first),
                              mix_pairs(tuned["val"], mapped["val"], first))
    assert grid[best] >= max(after.values())
    # the bank fits the mix at its weight, the tuned side alone (its own width) included
    for w in (0.0, 0.5):
        b = HubnessBank.from_pairs(mix_pairs(tuned["train"], mapped["train"], w), k=10, beta=0.5)
        assert b.correct(mix_pairs(tuned["val"], mapped["val"], w)).images.shape[1] == \
            (8 if w == 0 else 16) + 1 + 2  # [x, 1, one hubness column per banked language]


def test_bad_weights_and_different_tables_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"weight=1.5 must be in \[0, 1\]"):
        mix_pairs(_pairs(0), _pairs(1), 1.5)
    short = EmbeddedPairs(torch.randn(4, 6), torch.randn(8, 6), torch.arange(8) % 4, None, [])
    with pytest.raises(DataError, match="5 / 4 images"):
        mix_pairs(_pairs(0), short, 0.5)


def test_fit_ridge_ensemble_keeps_the_frozen_towers_and_chooses_on_validation(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, "recipes/methods/layernorm.yaml")
    train = lilt.load_pairs("builtin:tiny-random:train")
    val, test = lilt.load_pairs("builtin:tiny-random:validation"), lilt.load_pairs("builtin:tiny-random:test")
    frozen_before = lilt.DualEncoder(model.config).eval()
    with torch.no_grad():  # "tune" the model: its norms move, the ensemble's frozen side must not
        for name, p in model.named_parameters():
            if p.requires_grad and "vision" in name:
                p.add_(0.5)
    ensemble, tried = fit_ridge_ensemble(model, train, val)
    assert sorted(tried) == list(DEFAULT_WEIGHTS) and ensemble.weight == max(tried, key=tried.__getitem__)
    feats = lilt.eval.embed_pairs(ensemble.frozen, test, features=True)
    assert torch.allclose(feats.images, lilt.eval.embed_pairs(frozen_before, test, features=True).images)
    assert not torch.allclose(feats.images, lilt.eval.embed_pairs(model, test, features=True).images)
    scores = ensemble.evaluate(test)
    ensemble.weight = 0.0
    assert ensemble.evaluate(test) == lilt.evaluate_retrieval(model, test)
    assert set(scores) == set(lilt.evaluate_retrieval(model, test))


@pytest.mark.parametrize("vision", ["vit", "cnn"])
def test_stage_features_lead_with_the_pooled_ones_then_each_block_pooled(make_model, vision):
    model = make_model(vision).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        stages = model.image_stage_features(pixels)
        pooled = model.image_features(pixels)
    tower = model.vision
    width = tower.hidden_size + sum(tower.block_channels(i) for i in range(tower.num_blocks))
    assert stages.shape == (3, width) and width > tower.hidden_size
    assert torch.allclose(stages[:, :tower.hidden_size], pooled, atol=1e-5)
    # the last block's pooled output: the mean over positions of the hidden states the finish reads
    with torch.no_grad():
        hidden, context = tower.forward_prefix(pixels.to(model.device), tower.num_blocks)
    dims = (2, 3) if hidden.dim() == 4 else (1,)
    assert torch.allclose(stages[:, -tower.block_channels(tower.num_blocks - 1):], hidden.mean(dims), atol=1e-5)


def test_a_ridge_ensemble_on_stage_features_reads_them_at_fit_and_at_scoring(make_model):
    model = make_model("cnn")
    train = lilt.load_pairs("builtin:tiny-random:train")
    val, test = lilt.load_pairs("builtin:tiny-random:validation"), lilt.load_pairs("builtin:tiny-random:test")
    ensemble, _ = fit_ridge_ensemble(model, train, val, stages=True)
    tower = model.vision
    width = tower.hidden_size + sum(tower.block_channels(i) for i in range(tower.num_blocks))
    assert ensemble.stages and ensemble.ridge.weight.shape[0] == width
    ensemble.weight = 1.0  # the ridge side alone: the map's own retrieval on the stage features
    feats = lilt.eval.embed_pairs(ensemble.frozen, test, features="stages")
    assert ensemble.evaluate(test)["en"] == lilt.baselines.ridge_retrieval(ensemble.ridge, feats)["en"]
    with pytest.raises(ConfigError, match="features='layers' must be"):
        lilt.eval.embed_pairs(model, test, features="layers")


def test_a_kernel_ridge_ensemble_scores_with_its_kernel_map(make_model):
    model = make_model("cnn")
    train = lilt.load_pairs("builtin:tiny-random:train")
    val, test = lilt.load_pairs("builtin:tiny-random:validation"), lilt.load_pairs("builtin:tiny-random:test")
    ensemble, _ = fit_ridge_ensemble(model, train, val, stages=True, kernel="rbf")
    assert isinstance(ensemble.ridge, lilt.baselines.KernelRidgeMap)
    distinct = lilt.baselines.pair_features(ensemble.frozen, train, stages=True).images
    assert ensemble.ridge.support.shape == distinct.shape  # one row per distinct training image, not per caption
    ensemble.weight = 1.0
    feats = lilt.eval.embed_pairs(ensemble.frozen, test, features="stages")
    assert ensemble.evaluate(test)["en"] == lilt.baselines.ridge_retrieval(ensemble.ridge, feats)["en"]
    with pytest.raises(ConfigError, match="kernel='poly' is not one of"):
        fit_ridge_ensemble(model, train, val, kernel="poly")
    two_way, _ = fit_ridge_ensemble(model, train, val, stages=True, kernel="rbf-two-way")
    assert isinstance(two_way.ridge, lilt.baselines.TwoWayMap)
    two_way.weight = 1.0  # the ridge side alone scores as the two-way map does
    assert two_way.evaluate(test)["en"] == lilt.baselines.ridge_retrieval(two_way.ridge, feats)["en"]


def test_a_ridge_map_on_the_tuned_towers_reads_the_models_own_features(make_model):
    model = make_model("cnn")
    with torch.no_grad():  # "tuning": the towers' features move away from the pretrained ones
        for p in [*model.vision.parameters(), *model.text.parameters()]:
            p.mul_(1.25)
    train = lilt.load_pairs("builtin:tiny-random:train")
    val, test = lilt.load_pairs("builtin:tiny-random:validation"), lilt.load_pairs("builtin:tiny-random:test")
    tuned, _ = fit_ridge_ensemble(model, train, val, stages=True, kernel="rbf", towers="tuned")
    assert tuned.frozen is model  # no frozen copy: the map reads the model's own towers
    frozen, _ = fit_ridge_ensemble(model, train, val, stages=True, kernel="rbf")
    own = lilt.eval.embed_pairs(model, test, features="stages")
    pretrained = lilt.eval.embed_pairs(frozen.frozen, test, features="stages")
    assert not torch.allclose(own.images, pretrained.images)  # the two kinds of towers read differently
    assert not torch.equal(tuned.ridge.support, frozen.ridge.support)  # and the maps were fitted on what each reads
    tuned.weight = 1.0
    assert tuned.evaluate(test)["en"] == lilt.baselines.ridge_retrieval(tuned.ridge, own)["en"]
    with pytest.raises(ConfigError, match="towers='pretrained' .*choose one of \\['frozen', 'tuned'\\]"):
        fit_ridge_ensemble(model, train, val, towers="pretrained")
    with pytest.raises(ConfigError, match="pass no frozen model with it"):
        fit_ridge_ensemble(model, train, val, towers="tuned", frozen=frozen.frozen)


def test_fit_ridge_ensemble_with_hubness_chooses_the_bank_with_the_weight(make_model):
    model = make_model("vit")
    train = lilt.load_pairs("builtin:tiny-random:train")
    val, test = lilt.load_pairs("builtin:tiny-random:validation"), lilt.load_pairs("builtin:tiny-random:test")
    ensemble, tried = fit_ridge_ensemble(model, train, val, hubness=True)
    assert ensemble.hubness is not None and len(tried) > len(DEFAULT_WEIGHTS)
    best = max(tried, key=tried.__getitem__)
    assert best == f"w={ensemble.weight:g} k={ensemble.hubness.k} beta={ensemble.hubness.beta:g}"
    assert ensemble.evaluate(test) == retrieval_by_lang(ensemble.hubness.correct(ensemble.embed_pairs(test)))
