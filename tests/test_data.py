"""Pair sources of every kind, the collate function's handling of bad items, seeded augmentation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lilt.config import DataError
from lilt.data import PairCollator, image_transform, load_pairs, pair_loader

from helpers import DATA_CONFIG, FOLDER_CAPTIONS as CAPTIONS, write_images, write_imagefolder


def collator(tokenize=lambda texts: {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long)}, **kw):
    return PairCollator(image_transform(DATA_CONFIG, kw.pop("augment", "none")), tokenize, **kw)


def test_imagefolder_with_metadata_and_caption_column(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "f", 6)
    with pytest.raises(DataError, match="text_column"):
        load_pairs(folder)
    data = load_pairs(folder, text_column="caption")
    assert data.column_names == ["image", "text", "lang"] and len(data) == 6
    assert data[0]["text"] == "a red square" and Path(data[0]["image"]["path"]).is_file()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_tables_resolve_image_paths_relative_to_the_table(tmp_path: Path, kind: str) -> None:
    names = write_images(tmp_path / "imgs", 4)
    table = datasets.Dataset.from_dict({"file": [f"imgs/{n}" for n in names], "caption": CAPTIONS[:4]})
    path = tmp_path / f"pairs.{kind}"
    {"csv": table.to_csv, "jsonl": table.to_json, "parquet": table.to_parquet}[kind](str(path))
    data = load_pairs(path, image_column="file", text_column="caption")
    assert len(data) == 4 and Path(data[3]["image"]).is_file()
    batch = collator()([{**row, "__row__": i} for i, row in enumerate(data)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["bad"] == []


def test_save_to_disk_dataset_dict_and_split_errors(tmp_path: Path) -> None:
    names = write_images(tmp_path / "imgs", 4)
    rows = {"image": [str(tmp_path / "imgs" / n) for n in names], "text": CAPTIONS[:4]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(tmp_path / "dd", "test")) == 4
    with pytest.raises(DataError, match="no split 'validation'"):
        load_pairs(tmp_path / "dd", "validation")


def test_webdataset_shards_stream(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(buffer, format="JPEG")
            for ext, payload in (("jpg", buffer.getvalue()), ("txt", CAPTIONS[i].encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = load_pairs(shard)
    assert isinstance(data, datasets.IterableDataset)
    rows = list(data)
    assert [r["text"] for r in rows] == CAPTIONS[:5]
    batch = next(iter(pair_loader(data, collator(), 4, shuffle=False)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)


def test_unknown_spec_and_builtin_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="emoji-cldr"):
        load_pairs("builtin:emoji-cdlr")
    with pytest.raises(DataError, match="cannot read pairs"):
        load_pairs(str(tmp_path))


def test_collate_skips_and_names_bad_items(tmp_path: Path) -> None:
    names = write_images(tmp_path, 4, corrupt=1)
    items = [{"image": {"path": str(tmp_path / n), "bytes": None}, "text": CAPTIONS[i], "__row__": i}
             for i, n in enumerate(names)]
    items[2]["text"] = "  "
    items.append({"image": {"path": str(tmp_path / "missing.png"), "bytes": None}, "text": "x", "__row__": 4})
    batch = collator()(items)
    assert batch["seen"] == 5 and batch["rows"].tolist() == [1, 3]
    assert len(batch["bad"]) == 3
    assert "img000.png" in batch["bad"][0] and "empty caption" in batch["bad"][1] and "missing.png" in batch["bad"][2]


def test_augmentation_is_seeded_per_sample_and_epoch_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    names = write_images(tmp_path, 2, size=32)
    item = {"image": {"path": str(tmp_path / names[1]), "bytes": None}, "text": "x", "__row__": 7}
    collate = collator(augment="randaugment", seed=3)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = collate([{**item, "__epoch__": 0}])["pixel_values"]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, collate([{**item, "__epoch__": 0}])["pixel_values"])
    assert not torch.equal(a, collate([{**item, "__epoch__": 1}])["pixel_values"])


def test_pairs_per_lang_and_langs_filter() -> None:
    data = load_pairs("builtin:tiny-random", langs=["en", "sw"], pairs_per_lang={"sw": 3}, n=30)
    langs = data["lang"]
    assert set(langs) == {"en", "sw"} and langs.count("sw") == 3 and langs.count("en") == 10
    assert load_pairs("builtin:tiny-random", langs=["en", "sw"], pairs_per_lang={"sw": 3}, n=30)["text"] == \
        data["text"]


def test_load_labelled_keeps_integer_ids_and_aligns_a_test_split_to_training_names(tmp_path: Path) -> None:
    from lilt.data import load_labelled

    write_imagefolder(tmp_path / "f", 12)
    rows = [{"file": f"f/img{i:03d}.png", "n": i, "cls": ["cat", "dog", "fish"][i % 3]} for i in range(12)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ints = load_labelled(tmp_path / "t.jsonl", image_column="file", label_column="n")
    assert ints["label"] == list(range(12))  # not re-sorted as strings ("10" before "2")
    test_rows = [r for r in rows if r["cls"] != "dog"]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test_rows))
    test = load_labelled(tmp_path / "test.jsonl", image_column="file", label_column="cls",
                         names=["cat", "dog", "fish"])
    assert test.features["label"].names == ["cat", "dog", "fish"] and set(test["label"]) == {0, 2}
    with pytest.raises(DataError, match="not among the 2 classes"):
        load_labelled(tmp_path / "t.jsonl", image_column="file", label_column="cls", names=["cat", "fish"])
    with pytest.raises(DataError, match="not labelled images"):
        load_labelled("builtin:tiny-random")


@pytest.mark.parametrize("augment", ["crop-flip", "crop", "style", "randaugment", "stacked-randaugment"])
def test_no_augmentation_preset_fails_on_a_valid_image(augment: str) -> None:
    # The earlier stacked preset's posterize kept 0 bits at its top magnitude, which Pillow refuses.
    transform = image_transform(DATA_CONFIG, augment)
    rng = np.random.default_rng(0)
    for seed in range(300):
        image = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        with _seeded_for_test(seed):
            assert transform(image).shape == (3, 16, 16)


@pytest.mark.parametrize("augment", ["crop", "style"])
def test_meaning_preserving_presets_never_mirror_nor_shift_hue(augment: str) -> None:
    # Red on the left, blue on the right: a mirror swaps them, a hue shift or grayscale loses them.
    half = np.zeros((32, 32, 3), dtype=np.uint8)
    half[:, :16, 0], half[:, 16:, 2] = 220, 220
    transform = image_transform({**DATA_CONFIG, "input_size": (3, 32, 32)}, augment)
    flipping = image_transform({**DATA_CONFIG, "input_size": (3, 32, 32)}, "crop-flip")
    mirrored = 0
    for seed in range(40):
        with _seeded_for_test(seed):
            out = transform(Image.fromarray(half))
        with _seeded_for_test(seed):
            flipped = flipping(Image.fromarray(half))
        mirrored += int(flipped[0, :, :8].mean() < flipped[2, :, :8].mean())
        left, right = out[:, :, :10].mean(dim=(1, 2)), out[:, :, -10:].mean(dim=(1, 2))
        assert left[0] > left[2] and right[2] > right[0], (seed, left, right)
    assert mirrored > 5  # the flipping preset does mirror: the assertion above can fail


def _seeded_for_test(seed: int):
    from lilt.data.transforms import _seeded
    return _seeded(seed, 0, seed)
