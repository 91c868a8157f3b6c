"""The CSLS hubness correction: exact scores, per-language banks, a hub it removes, the choice on validation."""

import pytest
import torch
import torch.nn.functional as F

from lilt.baselines import fit_ridge, ridge_pairs, ridge_retrieval
from lilt.errors import ConfigError
from lilt.eval import EmbeddedPairs, HubnessBank, choose_hubness, retrieval_by_lang
from lilt.eval.hubness import mean_top_k


def _unit(*rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.stack(rows), dim=-1)


def _hub_world(dim: int = 40, n: int = 16) -> tuple[EmbeddedPairs, EmbeddedPairs]:
    """Test images near a shared direction e0, each caption mostly its own direction; one caption *is* e0 (the hub)."""
    e = torch.eye(dim)
    images = _unit(e[0], *[0.8 * e[0] + 0.6 * e[1 + i] for i in range(n)])
    texts = _unit(e[0], *[0.2 * e[0] + e[1 + i] for i in range(n)])
    test = EmbeddedPairs(images, texts, torch.arange(n + 1), ["en"] * (n + 1), [])
    # training images are drawn like the test ones, in directions of their own
    train_images = _unit(*[0.8 * e[0] + 0.6 * e[1 + n + j] for j in range(n)])
    train_texts = _unit(*[0.2 * e[0] + e[1 + n + j] for j in range(n)])
    return EmbeddedPairs(train_images, train_texts, torch.arange(n), ["en"] * n, []), test


def test_the_correction_removes_a_hub_that_wins_every_query():
    train, test = _hub_world()
    before = retrieval_by_lang(test)["en"]["i2t/R@1"]
    after = retrieval_by_lang(HubnessBank.from_pairs(train, k=5, beta=0.5).correct(test))["en"]["i2t/R@1"]
    assert before == pytest.approx(100 / 17)  # only the hub's own image finds its caption
    assert after == pytest.approx(100.0)


def test_corrected_dot_products_are_cos_minus_beta_times_each_gallery_items_hubness():
    g = torch.Generator().manual_seed(0)
    train = EmbeddedPairs(torch.randn(30, 8, generator=g), torch.randn(36, 8, generator=g),
                          torch.arange(36) % 30, ["en"] * 20 + ["sw"] * 12 + ["yo"] * 4, [])
    test = EmbeddedPairs(torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g),
                         torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2]), ["en"] * 3 + ["sw"] * 3 + ["yo"] * 3, [])
    k, beta = 5, 0.7
    bank = HubnessBank.from_pairs(train, k=k, beta=beta)
    corrected = bank.correct(test)
    got = corrected.texts @ corrected.images.t()
    images, texts = F.normalize(test.images, dim=-1), F.normalize(test.texts, dim=-1)
    caption_hub = (texts @ F.normalize(train.images, dim=-1).t()).topk(k, dim=-1).values.mean(-1)
    want = texts @ images.t() - beta * caption_hub[:, None]
    for lang, rows in (("en", slice(0, 20)), ("sw", slice(20, 32))):  # yo: 4 captions < k, no image-side term
        image_hub = (images @ F.normalize(train.texts[rows], dim=-1).t()).topk(k, dim=-1).values.mean(-1)
        mine = [i for i, x in enumerate(test.langs) if x == lang]
        want[mine] -= beta * image_hub[None, :]
    assert torch.allclose(got, want, atol=1e-5)
    plain = HubnessBank.from_pairs(train, k=k, beta=0.0).correct(test)
    assert torch.allclose(plain.texts @ plain.images.t(), texts @ images.t(), atol=1e-6)


def test_choose_hubness_picks_a_correction_when_validation_has_hubs_and_none_when_it_hurts():
    train, val = _hub_world()
    bank, tried = choose_hubness(train, val, ks=(5,), betas=(0.0, 0.5))
    assert bank.beta == 0.5 and bank.k == 5 and tried["k=5 beta=0.5"] > tried["k=5 beta=0"]
    # the same world with the hub's caption moved off the shared direction: nothing to correct, beta 0 stays
    e = torch.eye(40)
    calm = EmbeddedPairs(val.images, torch.cat([e[39][None], val.texts[1:]]), val.text_image, val.langs, [])
    bank, tried = choose_hubness(train, calm, ks=(5,), betas=(0.0, 0.5))
    assert bank.beta == 0.0 and tried["k=5 beta=0"] >= tried["k=5 beta=0.5"]


def test_ridge_retrieval_takes_a_bank_of_its_own_mapped_training_pairs():
    g = torch.Generator().manual_seed(1)
    train = EmbeddedPairs(torch.randn(40, 12, generator=g), torch.randn(40, 10, generator=g), torch.arange(40),
                          ["en"] * 40, [])
    ridge = fit_ridge(train)
    bank = HubnessBank.from_pairs(ridge_pairs(ridge, train), k=5, beta=0.5)
    corrected = retrieval_by_lang(bank.correct(ridge_pairs(ridge, train)))["en"]
    assert ridge_retrieval(ridge, train, hubness=bank)["en"] == corrected
    assert ridge_retrieval(ridge, train, hubness=bank)["en"] != ridge_retrieval(ridge, train)["en"]


def test_bad_strengths_are_one_line_errors_naming_the_value():
    train, _ = _hub_world()
    with pytest.raises(ConfigError, match=r"k=99 .*16 images"):
        HubnessBank.from_pairs(train, k=99)
    with pytest.raises(ConfigError, match=r"beta=-1"):
        HubnessBank.from_pairs(train, k=5, beta=-1)
    with pytest.raises(ConfigError, match=r"ks=\[50\]"):
        choose_hubness(train, train, ks=(50,))
    assert mean_top_k(torch.zeros(0, 4), torch.randn(3, 4), 2).shape == (0,)
