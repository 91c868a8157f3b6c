"""Translation maps from parallel text: exact maps on a known rotation, per-language choice on validation, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lilt.data.parallel import load_parallel
from lilt.errors import ConfigError, DataError
from lilt.eval import EmbeddedPairs, retrieval_by_lang
from lilt.eval.translate import TranslationMaps, choose_translation, embed_parallel, fit_translation

from test_parallel import write_parallel

DIM = 12


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed)))
    return q


def _world(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n concepts: image embeddings and their English caption embeddings (the same direction plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    return images, F.normalize(images + 0.05 * torch.randn(n, DIM, generator=g), dim=-1)


def _val(images: torch.Tensor, english: torch.Tensor, rotations: dict[str, torch.Tensor]) -> EmbeddedPairs:
    """Validation pairs: English captions, and per language the same captions seen through its rotation."""
    n = len(images)
    texts = [english] + [english @ r for r in rotations.values()]
    langs = ["en"] * n + [lang for lang in rotations for _ in range(n)]
    return EmbeddedPairs(images, torch.cat(texts), torch.arange(n).repeat(1 + len(rotations)), langs, [])


def test_a_map_fitted_on_parallel_pairs_undoes_a_rotation_of_one_language_only():
    _, english = _world(60, 0)
    rot = _rotation(1)
    maps = fit_translation(english, english @ rot, ["sw"] * 60, alpha=1e-3)
    images, held_out = _world(20, 2)  # concepts the parallel text never named
    translated = maps.translate(held_out @ rot, "sw")
    assert torch.allclose(translated, held_out, atol=1e-3)
    pairs = _val(images, held_out, {"sw": rot, "yo": _rotation(3)})
    moved = maps.apply(pairs)
    assert torch.equal(moved.images, pairs.images)
    assert torch.equal(moved.texts[:20], pairs.texts[:20])  # English: no map
    assert torch.equal(moved.texts[40:], pairs.texts[40:])  # yo has no map: untouched
    assert torch.allclose(moved.texts[20:40], held_out, atol=1e-3)
    before, after = retrieval_by_lang(pairs)["sw"]["i2t/R@1"], retrieval_by_lang(moved)["sw"]["i2t/R@1"]
    assert after == 100.0 and before < 50.0
    half = TranslationMaps(maps.maps, {"sw": 0.5}).translate(held_out @ rot, "sw")
    expected = F.normalize(0.5 * held_out + 0.5 * held_out @ rot, dim=-1)
    assert torch.allclose(half, expected, atol=1e-3)
    assert torch.equal(TranslationMaps(maps.maps, {"sw": 0.0}).translate(held_out @ rot, "sw"), held_out @ rot)


def test_validation_turns_on_a_map_that_helps_and_off_one_that_hurts():
    _, english = _world(80, 0)
    rot_sw = _rotation(1)
    noise = torch.randn(80, DIM, generator=torch.Generator().manual_seed(9))  # yo "parallel text" that is noise
    source = torch.cat([english, english])
    target = torch.cat([english @ rot_sw, noise])
    images, held_out = _world(30, 4)
    val = _val(images, held_out, {"sw": rot_sw, "yo": torch.eye(DIM)})  # yo captions already sit by the English
    maps, tried = choose_translation(source, target, ["sw"] * 80 + ["yo"] * 80, val)
    assert maps.strength["sw"] > 0 and tried["sw"]["off"] < max(tried["sw"].values())
    assert maps.strength["yo"] == 0.0 and tried["yo"]["off"] == max(tried["yo"].values())
    assert set(tried["sw"]) == {"off"} | {f"alpha {a:g} strength {s:g}" for a in (1, 10, 100, 1000)
                                          for s in (0.5, 0.75, 1)}


def test_bad_inputs_are_one_line_errors():
    x = torch.randn(4, DIM)
    with pytest.raises(DataError, match="4 sources, 3 targets"):
        fit_translation(x, x[:3], ["sw"] * 3)
    with pytest.raises(DataError, match="1 pair\\(s\\) in 'yo'"):
        fit_translation(x, x, ["sw", "sw", "sw", "yo"])
    with pytest.raises(ConfigError, match="strength 1.5 for 'sw'"):
        TranslationMaps(fit_translation(x, x, ["sw"] * 4).maps, {"sw": 1.5})
    val = EmbeddedPairs(x, x, torch.arange(4), None, [])
    with pytest.raises(DataError, match="language column"):
        choose_translation(x, x, ["sw"] * 4, val)
    with pytest.raises(DataError, match="no validation captions in 'sw'"):
        choose_translation(x, x, ["sw"] * 4, EmbeddedPairs(x, x, torch.arange(4), ["en"] * 4, []))


def test_a_recipe_that_translates_without_parallel_text_is_a_one_line_error():
    from lilt.recipe import Recipe

    with pytest.raises(ConfigError, match="eval.translate fits its maps on parallel text: set data.parallel"):
        Recipe.from_file("demo", ["data.parallel=null"])


def test_embed_parallel_embeds_both_columns_in_the_model_space(make_model, tmp_path: Path):
    model = make_model("vit")
    model.train()
    table = load_parallel(str(write_parallel(tmp_path / "par.csv")))
    source, target, langs = embed_parallel(model, table)
    assert model.training  # put back as it was
    assert source.shape == target.shape == (24, model.config.embed_dim) and langs == list(table["lang"])
    assert torch.allclose(source[:3], model.eval().encode_text(list(table["source"][:3])).detach(), atol=1e-5)
    feats, _, _ = embed_parallel(model, table, features=True, transform=lambda t: 2 * t)
    assert torch.allclose(feats[:3], 2 * model.text_features(model.tokenize(list(table["source"][:3]))).detach(),
                          atol=1e-5)
