"""Zero-shot classification: templates, prompt ensembling, accuracy on a model whose answers are known."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from lilt.config import ConfigError, DataError
from lilt.data import emoji_cldr, load_pairs
from lilt.eval.zeroshot import (TEMPLATES_FILE, class_embeddings, embed_images, emoji_zeroshot, evaluate_zeroshot,
                                load_templates, topk_accuracy, topk_hits)

from helpers import COLOURS, FakeModel, colour_data


@pytest.fixture()
def rgb_data() -> datasets.Dataset:
    """Six images: red, green, blue twice, labelled cat=0, dog=1, bird=2."""
    return colour_data([COLOURS["red"], COLOURS["green"], COLOURS["blue"]] * 2, [0, 1, 2] * 2)


def test_known_model_is_right_and_a_wrong_naming_scores_exactly_lower(rgb_data: datasets.Dataset) -> None:
    model = FakeModel()
    names = {"en": ["cat", "dog", "bird"], "sw": ["mbwa", "paka", "ndege"]}  # sw: cat and dog swapped on purpose
    out = evaluate_zeroshot(model, rgb_data, names, {"en": ["a photo of a {}.", "{}"], "sw": ["picha ya {}."]})
    assert out["en"]["top1"] == 100.0
    assert out["sw"]["top1"] == pytest.approx(100 / 3)  # only the birds are right
    assert out["mean"]["top1"] == pytest.approx((100 + 100 / 3) / 2) and out["mean"]["languages"] == 2
    assert out["en"]["classes"] == 3 and out["en"]["images"] == 6
    assert "top5" not in out["en"]  # top-5 of 3 classes would be a trivial 100
    assert model.images_seen == 6  # images embedded once for both languages
    assert model.training_while_encoding == {False} and model.training  # eval while encoding, then restored


def test_plain_list_of_names_takes_the_only_template_language(rgb_data: datasets.Dataset) -> None:
    out = evaluate_zeroshot(FakeModel(), rgb_data, ["paka", "mbwa", "ndege"], {"sw": ["picha ya {}."]})
    assert set(out) == {"sw", "mean"} and out["sw"]["top1"] == 100.0
    out = evaluate_zeroshot(FakeModel(), rgb_data, ["cat", "dog", "bird"])  # shipped templates: English
    assert set(out) == {"en", "mean"} and out["en"]["top1"] == 100.0
    shared = evaluate_zeroshot(FakeModel(), rgb_data, {"en": ["cat", "dog", "bird"], "xx": ["dog", "cat", "bird"]},
                               ["an emoji of {}."])  # one list of templates for every language
    assert shared["en"]["top1"] == 100.0 and shared["xx"]["top1"] == pytest.approx(100 / 3)


def test_top5_with_enough_classes_and_ties_score_chance(rgb_data: datasets.Dataset) -> None:
    names = ["cat", "dog", "bird", "cat dog", "dog bird", "cat bird"]
    data = colour_data([COLOURS["red"], COLOURS["green"]], [3, 1])
    out = evaluate_zeroshot(FakeModel(), data, names, ["{}"])["en"]
    # Red image: "cat" scores 1, then "cat dog" (its label) ties "cat bird" at 0.71: rank 2 or 3, top-1 miss.
    assert out["top1"] == 50.0 and out["top5"] == 100.0
    # A model that cannot tell the classes apart scores chance (ties broken at random on average): 1/3.
    collapsed = evaluate_zeroshot(FakeModel(), rgb_data, ["fish", "fish", "fish"], ["{}"])
    assert collapsed["en"]["top1"] == pytest.approx(100 / 3)


def test_topk_hits_counts_strictly_higher_scores_and_splits_ties() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0],    # label 1: one higher -> rank 1
                           [0.2, 0.2, 0.2, 0.9],    # label 0: one higher, tied with two others -> rank 1, 2 or 3
                           [0.3, 0.3, 0.3, 0.3]])   # label 2: all tied -> chance
    labels = torch.tensor([1, 0, 2])
    torch.testing.assert_close(topk_hits(scores, labels, 1), torch.tensor([0.0, 0.0, 0.25], dtype=torch.double))
    torch.testing.assert_close(topk_hits(scores, labels, 2), torch.tensor([1.0, 1 / 3, 0.5], dtype=torch.double))
    torch.testing.assert_close(topk_hits(scores, labels, 3), torch.tensor([1.0, 2 / 3, 0.75], dtype=torch.double))
    expected = {"top1": 25 / 3, "top3": 100 * (1 + 2 / 3 + 0.75) / 3}  # no top5: only 4 classes
    assert topk_accuracy(scores, labels, (1, 3, 5)) == pytest.approx(expected)


def test_language_without_templates_falls_back_to_bare_names(rgb_data: datasets.Dataset,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel()
    with caplog.at_level(logging.WARNING, logger="lilt.eval.zeroshot"):
        out = evaluate_zeroshot(model, rgb_data, {"en": ["cat", "dog", "bird"], "xx": ["paka", "mbwa", "ndege"]},
                                {"en": ["a photo of a {}."]})
    assert out["xx"]["top1"] == 100.0
    assert "'xx'" in caplog.text and "{}" in caplog.text
    assert model.text_calls == [3, 3]  # one batch per language: 3 classes x 1 template each


def test_bad_labels_names_and_columns_are_named(rgb_data: datasets.Dataset) -> None:
    model = FakeModel()
    with pytest.raises(DataError, match=r"outside 0\.\.1.*\[2, 2\] at rows \[2, 5\]"):
        evaluate_zeroshot(model, rgb_data, ["cat", "dog"])
    with pytest.raises(DataError, match="outside"):
        evaluate_zeroshot(model, rgb_data.map(lambda r: {"label": r["label"] - 1}), ["cat", "dog", "bird"])
    with pytest.raises(ConfigError, match=r"same non-empty list.*'en': 3, 'sw': 2"):
        evaluate_zeroshot(model, rgb_data, {"en": ["cat", "dog", "bird"], "sw": ["paka", "mbwa"]})
    with pytest.raises(DataError, match="no label column 'target'"):
        evaluate_zeroshot(model, rgb_data, ["cat", "dog", "bird"], label_column="target")
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate_zeroshot(model, rgb_data, ["cat", "dog", "bird"], ["a photo"])
    assert model.images_seen == 0  # every check happens before the images are embedded


def test_undecodable_image_is_an_error_naming_the_row(rgb_data: datasets.Dataset) -> None:
    rows = rgb_data.to_dict()
    rows["image"][4] = {"bytes": b"not a png", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=rgb_data.features)
    with pytest.raises(DataError, match=r"1 of 6 images could not be read: row 4"):
        embed_images(FakeModel(), broken, batch_size=4)


def test_class_embeddings_are_the_normalized_mean_of_normalized_template_embeddings() -> None:
    model = FakeModel(dim=6, unit_text=False)
    names, templates = ["cat", "dog", "red bird"], ["a photo of a {}.", "{}", "an emoji of {} on a sign"]
    got = class_embeddings(model, names, templates, batch_size=4)
    assert model.text_calls == [4, 4, 1]  # 9 captions in batches of 4, not one call per caption

    def embed(caption: str) -> torch.Tensor:
        return model.encode_text(model.tokenize([caption]))[0]

    by_hand = torch.stack([F.normalize(torch.stack([F.normalize(embed(t.format(c)), dim=-1) for t in templates])
                                       .mean(0), dim=-1) for c in names])
    torch.testing.assert_close(got, by_hand)
    # Averaging the raw vectors would let the longest caption dominate: a different answer.
    raw_mean = torch.stack([F.normalize(torch.stack([embed(t.format(c)) for t in templates]).mean(0), dim=-1)
                            for c in names])
    assert (got - raw_mean).abs().max() > 1e-3
    assert not torch.allclose(got, F.normalize(model.encode_text(model.tokenize(names)), dim=-1))  # templates count
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_shipped_templates_cover_the_languages_with_one_placeholder_each() -> None:
    templates = load_templates()
    assert len(templates) >= 11
    assert {"en", "sw", "yo", "am", "ha", "mr", "es", "fr", "de", "ar", "hi", "zh", "pt", "ru", "ig", "zu"} <= set(
        templates)
    for lang, items in templates.items():
        assert 4 <= len(items) <= 8 and "{}" in items, lang
        assert all(t.count("{}") == 1 for t in items), lang
    assert any("\u1200" <= ch <= "\u137f" for t in templates["am"] for ch in t)  # Ge'ez script
    assert any(ch in "àáèéìíòóùú" for t in templates["yo"] for ch in t)  # tone marks
    assert load_templates(TEMPLATES_FILE) == templates


def test_load_templates_from_files_and_mappings_and_errors(tmp_path: Path) -> None:
    as_yaml = tmp_path / "t.yaml"
    as_yaml.write_text('sw:\n  - "picha ya {}."\n  - "{}"\n"no":\n  - "et bilde av {}."\n', encoding="utf-8")
    assert load_templates(as_yaml) == {"sw": ["picha ya {}.", "{}"], "no": ["et bilde av {}."]}
    as_json = tmp_path / "t.json"
    as_json.write_text(json.dumps({"yo": ["àwòrán {}."]}, ensure_ascii=False), encoding="utf-8")
    assert load_templates(str(as_json)) == {"yo": ["àwòrán {}."]}
    assert load_templates({"en": ("{}",)}) == {"en": ["{}"]}
    with pytest.raises(ConfigError, match=r"'a photo of a' for language 'sw'.*exactly one '\{\}'"):
        load_templates({"en": ["{}"], "sw": ["a photo of a"]})
    with pytest.raises(ConfigError, match=r"'\{\} and \{\}' for language 'fr'.*found 2"):
        load_templates({"fr": ["{} and {}"]})
    with pytest.raises(ConfigError, match=r"'\{name\} photo \{\}'.*stray"):
        load_templates({"en": ["{name} photo {}"]})
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("no:\n  - '{}'\n")  # YAML 1.1 reads `no` as False
    with pytest.raises(ConfigError, match="quote it"):
        load_templates(unquoted)
    with pytest.raises(ConfigError, match="list of strings"):
        load_templates({"en": "a photo of a {}."})
    with pytest.raises(ConfigError, match="does not exist"):
        load_templates(tmp_path / "missing.yaml")


def test_tiny_towers_run_with_shipped_templates(make_model) -> None:
    model = make_model("vit")
    data = load_pairs("builtin:tiny-random", split="test", n=24)
    data = data.add_column("label", [i % 6 for i in range(len(data))])
    # English words are in the tiny tokenizer's vocabulary; the Swahili ones all become [UNK].
    names = {"en": ["cat", "dog", "car", "tree", "bird", "fish"], "sw": ["paka", "mbwa", "gari", "mti", "ndege",
                                                                         "samaki"]}
    out = evaluate_zeroshot(model, data, names, batch_size=8)
    assert set(out) == {"en", "sw", "mean"}
    for lang in ("en", "sw"):
        assert set(out[lang]) == {"top1", "top5", "classes", "images"} and out[lang]["images"] == 24
        assert 0 <= out[lang]["top1"] <= out[lang]["top5"] <= 100
    # Swahili classes are indistinguishable to this tokenizer: exactly chance, 1/6 and 5/6.
    assert out["sw"]["top1"] == pytest.approx(100 / 6) and out["sw"]["top5"] == pytest.approx(500 / 6)
    # English: the same numbers from the public pieces (random towers: class scores differ by ~1e-4).
    scores = embed_images(model, data) @ class_embeddings(model, names["en"], load_templates()["en"]).t()
    assert {k: out["en"][k] for k in ("top1", "top5")} == pytest.approx(
        topk_accuracy(scores, torch.tensor(data["label"]), (1, 5)))
    assert out["mean"]["top5"] == pytest.approx((out["en"]["top5"] + out["sw"]["top5"]) / 2)


needs_emoji = pytest.mark.skipif(
    not (Path(emoji_cldr.FONT_PATH).exists() and Path(emoji_cldr.CLDR_DIR).exists()),
    reason=f"the emoji font and CLDR annotations are not installed: {emoji_cldr.APT_HINT}")


@needs_emoji
def test_emoji_zeroshot_labels_and_names_are_aligned(tmp_path_factory: pytest.TempPathFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from lilt._io import lilt_home

    # Reuse the data `make demo` built when there is one (instant); else build a private copy (about 5 s).
    built = lilt_home() / "data" / f"emoji-cldr-v{emoji_cldr.VERSION}"
    cache = None if (built / "meta.json").is_file() else tmp_path_factory.mktemp("emoji") / "emoji-cldr"
    with caplog.at_level(logging.INFO, logger="lilt.eval.zeroshot"):
        data, names = emoji_zeroshot("train", langs=("en", "sw"), cache_dir=cache)  # the cat face is in train
    assert "dropped" in caplog.text
    assert list(names) == ["en", "sw"] and len(names["en"]) == len(names["sw"]) == len(data)
    assert data["label"] == list(range(len(data))) and len(set(data["emoji"])) == len(data)
    pairs = emoji_cldr.load_emoji_cldr("train", langs=["en", "sw"], cache_dir=cache)
    source = {(e, lang): text for e, lang, text in zip(pairs["emoji"], pairs["lang"], pairs["text"])}
    assert set(data["emoji"]) <= set(pairs["emoji"]) and len(data) >= 0.9 * len(set(pairs["emoji"]))
    for lang in ("en", "sw"):  # class i's name in each language is the name of row i's emoji
        assert [names[lang][i] for i in data["label"]] == [source[e, lang] for e in data["emoji"]]
    stems = [Path(image["path"]).stem for image in data["image"]]
    assert stems == ["-".join(f"{ord(c):x}" for c in e) for e in data["emoji"]]  # each row's image is its emoji
    cat = data["label"][stems.index("1f431")]
    assert names["en"][cat] == "cat face" and names["sw"][cat] == "uso wa paka"
