"""A newcomer's own data: one row per caption, columns named on the command line, clear one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lilt.cli import main
from lilt.data import load_pairs
from lilt.data.resolve import resolve_data
from lilt.config import DataConfig
from lilt.losses import clip_loss, siglip_loss

from helpers import lilt_train, losses, max_difference, weights, write_images

LANGS = ("en", "sw")


def multilingual(root: Path, n: int = 6) -> tuple[Path, Path]:
    """The same pairs twice: an imagefolder, and a JSONL table with one row per caption (relative paths)."""
    names = write_images(root / "folder" / "imgs", n)
    rows = [(f"imgs/{name}", f"picture {i} {'number' if lang == 'en' else 'namba'} {i}", lang)
            for i, name in enumerate(names) for lang in LANGS]
    (root / "folder" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f, "caption": c, "lang": g}) + "\n" for f, c, g in rows))
    table = root / "pairs.jsonl"
    table.write_text("".join(json.dumps({"path": f"folder/{f}", "caption": c, "lang": g}) + "\n" for f, c, g in rows))
    return root / "folder", table


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run `lilt` in-process; it must exit 2 with one line on stderr and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the loss -------------------------------------------------------------------------------------------
def _embeds(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 8, generator=g), dim=-1), F.normalize(torch.randn(n, 8, generator=g), dim=-1)


def _clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float, ids: list[int]) -> float:
    """Each row's own pair against the other rows' pairs of *other* images, both ways (loops)."""
    n, total = len(img), 0.0
    for i in range(n):
        others = [j for j in range(n) if j == i or ids[j] != ids[i]]
        for a, b in ((img, txt), (txt, img)):
            logits = {j: scale * float(a[i] @ b[j]) for j in others}
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / (2 * n)


def test_rows_of_one_image_are_not_each_others_negatives() -> None:
    img, txt = _embeds()
    scale = torch.tensor(10.0)
    distinct = torch.arange(6)
    # No repeated image: bit for bit the plain CLIP loss, so seeded runs on such data do not move.
    assert torch.equal(clip_loss(img, txt, scale, image_ids=distinct), clip_loss(img, txt, scale))
    assert torch.equal(siglip_loss(img, txt, scale, torch.tensor(-5.0), image_ids=distinct),
                       siglip_loss(img, txt, scale, torch.tensor(-5.0)))
    ids = [0, 0, 1, 2, 2, 2]  # image 0 has two captions in the batch, image 2 three
    masked = clip_loss(img, txt, scale, image_ids=torch.tensor(ids))
    assert float(masked) == pytest.approx(_clip_reference(img, txt, 10.0, ids), rel=1e-5)
    assert float(masked) < float(clip_loss(img, txt, scale))
    # A caption of the same image scoring higher must not raise the loss (it is not a negative).
    closer = txt.clone()
    closer[1] = F.normalize(img[0] + 0.01 * closer[1], dim=-1)
    before = _clip_reference(img, closer, 10.0, [0, 1, 2, 3, 4, 5])
    assert float(clip_loss(img, closer, scale, image_ids=torch.tensor([0, 0, 1, 2, 3, 4]))) < before
    # SigLIP: a pair of one image is a match (+1), every other pair a non-match.
    sig = siglip_loss(img, txt, scale, torch.tensor(-5.0), image_ids=torch.tensor(ids))
    signs = torch.where(torch.tensor(ids)[:, None] == torch.tensor(ids)[None, :], 1.0, -1.0)
    assert float(sig) == pytest.approx(float(-F.logsigmoid(signs * (10 * img @ txt.t() - 5)).sum() / 6), rel=1e-6)


# -- one row per caption scores like an imagefolder --------------------------------------------------------
def test_a_multilingual_table_scores_like_the_same_imagefolder(make_model, tmp_path: Path, capsys) -> None:
    import lilt

    folder, table = multilingual(tmp_path)
    model = make_model("vit")
    model.save_pretrained(tmp_path / "m")
    scores = {}
    for name, spec, column in (("folder", folder, []), ("table", table, ["--image-column", "path"])):
        argv = ["eval", "--model", str(tmp_path / "m"), "--data", str(spec), "--text-column", "caption", *column,
                "--out", str(tmp_path / name)]
        assert main(argv) == 0, capsys.readouterr().err
        scores[name] = {r["language"]: r["metrics"] for r in json.loads((tmp_path / name / "eval.json").read_text())}
    assert set(scores["table"]) == {"en", "sw", "all"}
    assert scores["table"] == scores["folder"]  # pooled and per language, counts included
    assert scores["table"]["all"]["images"] == 6 and scores["table"]["all"]["texts"] == 12
    # And in Python: the 12 rows are 6 images with 2 captions each.
    by_lang = lilt.evaluate_retrieval(model, load_pairs(table, image_column="path", text_column="caption"))
    assert by_lang["all"]["i2t/R@1"] == pytest.approx(scores["folder"]["all"]["i2t/R@1"])


def test_embed_images_of_a_table_without_captions(make_model, tmp_path: Path, capsys) -> None:
    import pyarrow.parquet as pq

    folder, table = multilingual(tmp_path)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    images_only = tmp_path / "images.jsonl"
    images_only.write_text("".join(json.dumps({"path": r["path"]}) + "\n" for r in rows))
    make_model("vit").save_pretrained(tmp_path / "m")
    assert main(["embed", "--model", str(tmp_path / "m"), "--data", str(images_only), "--image-column", "path",
                 "--what", "image", "--out", str(tmp_path / "index.parquet")]) == 0, capsys.readouterr().err
    assert pq.read_table(tmp_path / "index.parquet").num_rows == 6  # one vector per image, not per row


# -- one-line errors, exit 2 ---------------------------------------------------------------------------------
def test_data_errors_are_one_line(make_model, tmp_path: Path, capsys) -> None:
    folder, table = multilingual(tmp_path)
    make_model("vit").save_pretrained(tmp_path / "m")
    base = ["--model", str(tmp_path / "m"), "--data", str(table), "--image-column", "path"]
    err = one_line_error(capsys, ["eval", *base, "--text-column", "captions", "--out", str(tmp_path / "e")])
    assert "no column 'captions'" in err and "'caption'" in err  # names the columns that exist
    err = one_line_error(capsys, ["eval", *base, "--text-column", "caption", "--langs", "yo", "--out",
                                  str(tmp_path / "e")])
    assert "no captions in language yo" in err and "en, sw" in err
    err = one_line_error(capsys, ["embed", *base, "--what", "text", "--out", str(tmp_path / "x.parquet")])
    assert "no text column" in err and "text_column" in err
    err = one_line_error(capsys, ["eval", *base, "--text-column", "caption", "--split", "test"])
    assert "only split is 'train'" in err


def test_train_refuses_an_unknown_column_before_training(recipe: Path, tmp_path: Path, capsys) -> None:
    folder, table = multilingual(tmp_path)
    # A `text` column is there too: a misspelt text_column must not fall back on it and train silently.
    table.write_text(table.read_text().replace('"caption"', '"text"'))
    overrides = [f"data.source={table}", "data.options={}", "data.image_column=path", "data.text_column=captions"]
    err = one_line_error(capsys, ["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "out"),
                                  *overrides])
    assert "no column 'captions'" in err and "'text'" in err
    assert not (tmp_path / "out" / "model").exists()


def test_an_override_the_shell_split_names_the_quoted_fix(recipe: Path, capsys) -> None:
    err = one_line_error(capsys, ["train", "--recipe", str(recipe), "data.pairs_per_lang={sw:", "300}"])
    assert "'data.pairs_per_lang={sw: 300}'" in err
    err = one_line_error(capsys, ["train", "--recipe", str(recipe), "data.langs=[en,", "sw]", "train.steps=2"])
    assert "'data.langs=[en, sw]'" in err


# -- validation -------------------------------------------------------------------------------------------------
def test_val_fraction_holds_out_whole_images_and_a_one_split_folder_trains(tmp_path: Path, caplog) -> None:
    folder, table = multilingual(tmp_path, n=8)
    config = DataConfig(source=str(table), image_column="path", text_column="caption", val_fraction=0.25)
    train, val, _ = resolve_data(config, None, seed=0)
    train_images, val_images = set(train["image"]), set(val["image"])
    assert len(val_images) == 2 and not train_images & val_images and len(train) + len(val) == 16
    assert len(val) == 4 and sorted(val["lang"]) == ["en", "en", "sw", "sw"]  # every caption of a held-out image
    again, _, _ = resolve_data(config, None, seed=0)
    assert set(again["image"]) == train_images  # seeded
    _, val, _ = resolve_data(DataConfig(source=str(folder), text_column="caption"), None, seed=0)
    assert val is None and "data.val_fraction" in caplog.text  # the default val_split: a note, not a crash
    held_out = tmp_path / "held_out.jsonl"  # a validation table of its own: its one split is all validation
    held_out.write_text(table.read_text())
    config = DataConfig(source=str(table), val_source=str(held_out), image_column="path", text_column="caption")
    train, val, _ = resolve_data(config, None, seed=0)
    assert len(train) == len(val) == 16


def test_train_on_a_multilingual_table_with_val_fraction(recipe: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import lilt.training

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("image_ids"))
        return clip_loss(*args, **kwargs)

    monkeypatch.setattr(lilt.training, "clip_loss", recording)
    folder, table = multilingual(tmp_path, n=12)
    data = yaml.safe_load(recipe.read_text())
    data["data"] = {"source": str(table), "image_column": "path", "text_column": "caption", "val_fraction": 0.25,
                    "num_workers": 0}
    data["train"].update(steps=3, batch_size=6)
    recipe.write_text(yaml.safe_dump(data))
    assert main(["train", "--recipe", str(recipe), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and '"val/all/i2t/R@1"' in out and '"val/sw/t2i/R@1"' in out
    # The loop told the loss which rows share an image (9 training images, 2 captions each, batches of 6).
    assert len(seen) == 3 and all(ids is not None and len(ids) == 6 for ids in seen)
    assert any(len(set(ids.tolist())) < 6 for ids in seen)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [(), ("train.local_loss=true",)], ids=["global", "local-loss"])
def test_two_processes_mask_repeated_images_like_one(recipe: Path, tmp_path: Path, overrides) -> None:
    folder, table = multilingual(tmp_path, n=12)
    data = [f"data.source={table}", "data.options={}", "data.image_column=path", "data.text_column=caption"]
    one = lilt_train(recipe, tmp_path / "one", *data, *overrides)
    two = lilt_train(recipe, tmp_path / "two", *data, *overrides, processes=2)
    # The rows of an image split across the two processes are masked through the gathered ids alike.
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    summary = [line for line in two.stdout.splitlines() if "steps," in line and "samples/s" in line]
    assert len(summary) == 1 and one.stdout.count("samples/s") == 1  # the main process prints it, once


# -- small ones ------------------------------------------------------------------------------------------------
def test_info_methods_shows_defaults(capsys) -> None:
    assert main(["info", "--methods"]) == 0
    assert "reduction_factor (default " in capsys.readouterr().out


def test_local_loads_show_no_datasets_progress_bars(tmp_path: Path, capfd) -> None:
    import datasets

    folder, table = multilingual(tmp_path)
    assert datasets.is_progress_bar_enabled()
    assert len(load_pairs(table, image_column="path", text_column="caption")) == 12
    assert len(load_pairs(folder, text_column="caption")) == 12
    err = capfd.readouterr().err
    assert "Generating" not in err and "Map" not in err and "Downloading" not in err, err
    assert datasets.is_progress_bar_enabled()  # switched off around the local load only
