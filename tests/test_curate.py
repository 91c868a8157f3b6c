"""`lilt curate`: noisy emoji-cldr, top-share selection, outputs load_pairs reads, scorers, resumption, errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import COLOURS, FakeModel
from PIL import Image

import lilt
from lilt.cli import main
from lilt.config import ConfigError, CurateConfig, DataConfig
from lilt.baselines import RidgeMap, RidgeMoments, pair_features
from lilt.curation import CrossFitScorer, FrozenScorer, ModelScorer, curate, select_top
from lilt.data import emoji_cldr, load_pairs
from lilt.data.emoji_cldr import add_noise, load_emoji_cldr
from lilt.data.resolve import resolve_data

HAS_EMOJI = Path(emoji_cldr.FONT_PATH).exists() and Path(emoji_cldr.CLDR_DIR).exists()
ANIMAL = {"red": "cat", "green": "dog", "blue": "bird"}


def pair_table(folder: Path, n: int = 12, langs: tuple[str, ...] = ("en", "sw")) -> Path:
    """n pairs over the three colour images; captions 0, 6, 12... name the wrong animal (FakeModel scores them ~0)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(folder / f"{name}.png")
    rows = ["image,text,lang,wrong"]
    for i in range(n):
        colour, wrong = names[i % 3], i % 3 == 0 and i % 2 == 0
        animal = ANIMAL[names[(i + 1) % 3]] if wrong else ANIMAL[colour]
        rows.append(f"{colour}.png,a {animal} {'big ' * (i % 4)}number {i},{langs[i % len(langs)]},{wrong}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def text_length(images: list, texts: list[str]) -> np.ndarray:
    """A callable scorer: longer captions score higher (known order, no model)."""
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" for i in images)
    return np.array([len(t) for t in texts], dtype=float)


class Killed(Exception):
    """Stands for a SIGKILL in the middle of scoring."""


def without_paths(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "outputs"}


# -- noise ---------------------------------------------------------------------------------------
def test_add_noise_deranges_a_seeded_share_and_records_it() -> None:
    images = [{"path": f"/img/{i // 3}.png", "bytes": None} for i in range(60)]  # 3 captions per image
    features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": images, "text": [f"t{i}" for i in range(60)]}, features=features)
    noisy = add_noise(table, 0.3, seed=1, split="train")
    flags = np.asarray(noisy["noisy"])
    assert flags.sum() == 18 and noisy["text"] == table["text"]
    before = [x["path"] for x in table["image"]]
    after = [x["path"] for x in noisy["image"]]
    changed = np.array([a != b for a, b in zip(after, before)])
    assert (changed == flags).all()  # every noised caption has another image (never its own image back)
    assert sorted(np.array(after)[flags]) == sorted(np.array(before)[flags])  # re-paired among themselves
    again = add_noise(table, 0.3, seed=1, split="train")
    assert again["noisy"] == noisy["noisy"] and again["image"] == noisy["image"]
    assert add_noise(table, 0.3, seed=2, split="train")["noisy"] != noisy["noisy"]
    assert not any(add_noise(table, 0.3, seed=1, split="validation")["noisy"])  # only training is noised


@pytest.mark.skipif(not HAS_EMOJI, reason=f"the emoji font and CLDR data are not installed: {emoji_cldr.APT_HINT}")
def test_emoji_cldr_noise_option() -> None:
    cache = None  # the shared build ($LILT_HOME), made once; tests/test_emoji_cldr.py checks a fresh build
    clean = load_emoji_cldr("train", langs=["en"], cache_dir=cache)
    noisy = load_emoji_cldr("train", langs=["en"], cache_dir=cache, noise=0.3)
    assert abs(np.mean(noisy["noisy"]) - 0.3) < 0.01 and noisy["text"] == clean["text"]
    assert not any(load_emoji_cldr("validation", langs=["en"], cache_dir=cache, noise=0.3)["noisy"])
    with pytest.raises(ConfigError, match="noise=1.5"):
        DataConfig(source="builtin:emoji-cldr", options={"noise": 1.5})


# -- selection -----------------------------------------------------------------------------------
def test_select_top_globally_and_per_language() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.2, np.nan, 0.3, 0.4])
    langs = ["en"] * 5 + ["sw"] * 5
    assert np.flatnonzero(select_top(scores, langs, 0.4, per_lang=False)).tolist() == [0, 1, 2, 3]
    # per language, sw keeps its own best two although all of them score below en's
    assert np.flatnonzero(select_top(scores, langs, 0.4, per_lang=True)).tolist() == [0, 1, 8, 9]
    assert select_top(np.array([0.5, 0.5, 0.5]), None, 0.34, per_lang=True).tolist() == [True, False, False]
    assert select_top(scores, langs, 1.0, per_lang=False).all()


# -- curate end to end ---------------------------------------------------------------------------
def test_model_scorer_drops_the_mismatched_pairs_and_writes_loadable_outputs(tmp_path: Path) -> None:
    table = pair_table(tmp_path / "src")
    result = curate(str(table), scorer=ModelScorer(FakeModel()), keep=0.75, out=tmp_path / "out", progress=False)
    scores = pq.read_table(result.scores).to_pandas()
    wrong = load_pairs_raw(table)["wrong"]
    assert scores["score"][wrong].max() < 0.5 < scores["score"][~wrong].min()
    assert not scores["kept"][wrong].any() and scores["kept"].sum() == 9
    kept = load_pairs(result.kept)  # paths relative to kept.parquet, inside its folder: the default rule passes
    assert len(kept) == 9 and set(kept.column_names) == {"image", "text", "lang"}
    assert all(Path(p).resolve().parent == (tmp_path / "out" / "images").resolve() for p in kept["image"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kept"] == 9 and summary["discarded"] == 3 and summary["cut"] > 0.5
    assert summary["per_language"]["sw"]["pairs"] == 6 and "noise" not in summary
    assert (tmp_path / "out" / "histogram.png").read_bytes()[:4] == b"\x89PNG"


def load_pairs_raw(table: Path):
    import pandas as pd

    return pd.read_csv(table)


def test_callable_scorer_per_language_and_noise_metrics(tmp_path: Path) -> None:
    table = pair_table(tmp_path / "src", n=12)
    data = load_pairs(table)
    data = data.add_column("noisy", [i % 4 == 0 for i in range(12)])  # the shortest captions are the "noise"
    result = lilt.curate(data, scorer=text_length, keep=0.5, out=tmp_path / "out", per_lang=True, progress=False)
    scores = pq.read_table(result.scores).to_pandas()
    for lang in ("en", "sw"):
        mine = scores[scores["lang"] == lang]
        assert mine["kept"].sum() == 3
        assert mine[mine["kept"]]["score"].min() >= mine[~mine["kept"]]["score"].max()
    noise = result.summary["noise"]
    discarded, noisy = ~scores["kept"], scores["noisy"]
    assert noise["recall"] == pytest.approx((discarded & noisy).sum() / noisy.sum(), abs=1e-4) == 1.0
    assert noise["precision"] == pytest.approx((discarded & noisy).sum() / discarded.sum(), abs=1e-4)
    assert pq.read_table(result.kept).column("noisy").to_pylist() == [False] * 6


def test_rerun_after_an_interrupted_run_scores_only_missing_chunks_and_matches(tmp_path: Path) -> None:
    table = pair_table(tmp_path / "src", n=12)
    calls: list[int] = []
    killed: list[bool] = []

    def flaky(images: list, texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise Killed  # killed in the middle of the second chunk
        return text_length(images, texts)

    # chunk_size 4: each of the 3 images' 4 captions is one chunk, so there are three chunks.
    with pytest.raises(Killed):
        curate(str(table), scorer=flaky, keep=0.5, out=tmp_path / "out", chunk_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "chunks").glob("chunk-*")) == ["chunk-00000.parquet"]
    calls.clear()
    resumed = curate(str(table), scorer=flaky, keep=0.5, out=tmp_path / "out", chunk_size=4, progress=False)
    assert calls == [4, 4]  # the two missing chunks only
    whole = curate(str(table), scorer=flaky, keep=0.5, out=tmp_path / "whole", chunk_size=4, progress=False)
    assert pq.read_table(resumed.scores).equals(pq.read_table(whole.scores))
    assert pq.read_table(resumed.kept).equals(pq.read_table(whole.kept))
    assert without_paths(resumed.summary) == without_paths(whole.summary)


def test_frozen_scorer_on_tiny_towers_is_deterministic(tmp_path: Path, make_model) -> None:
    table = pair_table(tmp_path / "src", n=9)
    trusted = load_pairs(table)
    scorer = FrozenScorer(make_model("vit"), trusted, batch_size=4)
    first = curate(str(table), scorer=scorer, keep=0.5, out=tmp_path / "a", chunk_size=2, progress=False)
    second = curate(str(table), scorer=scorer, keep=0.5, out=tmp_path / "b", chunk_size=50, progress=False)
    a, b = (pq.read_table(r.scores).column("score").to_numpy() for r in (first, second))
    assert np.isfinite(a).all() and np.abs(a).max() <= 1 + 1e-5
    np.testing.assert_allclose(a, b, atol=1e-5)  # chunking does not change a pair's score
    assert first.summary["scorer"].startswith("frozen:")


def test_ridge_from_moments_is_the_direct_fit() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randn(40, 3, generator=gen)
    counts = torch.tensor([1, 2, 3, 1] * 10)
    rows = torch.repeat_interleave(torch.arange(40), counts)  # each input paired counts[i] times
    ys = y[rows] + 0.1 * torch.randn(len(rows), 3, generator=gen)
    sums = torch.zeros(40, 3, dtype=torch.float64).index_add_(0, rows, ys.double())
    first, second = RidgeMoments.zeros(6, 3), RidgeMoments.zeros(6, 3)
    first.add(x[:25], sums[:25], counts[:25])
    second.add(x[25:], sums[25:], counts[25:])
    direct, summed = RidgeMap.fit(x[rows], ys, alpha=3.0), RidgeMap.from_moments(first + second, alpha=3.0)
    for a, b in ((direct.weight, summed.weight), (direct.x_scale, summed.x_scale), (direct.y_mean, summed.y_mean)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    head = int(counts[:25].sum())  # rows are grouped by input, so the first 25 inputs' pairs come first
    alone = RidgeMap.fit(x[rows[:head]], ys[:head], alpha=3.0)
    torch.testing.assert_close(RidgeMap.from_moments(first + second - second, alpha=3.0).weight, alone.weight,
                               atol=1e-5, rtol=1e-5)


def colour_table(folder: Path, images: int = 8) -> Path:
    """`images` flat-colour images with two captions each (en, sw)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,text,lang"]
    for i in range(images):
        Image.new("RGB", (8, 8), (30 * i % 256, 255 - 20 * i, 90)).save(folder / f"c{i}.png")
        rows += [f"c{i}.png,colour number {i},en", f"c{i}.png,rangi namba {i},sw"]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_crossfit_scorer_fits_each_fold_without_its_images_and_resumes(tmp_path: Path, make_model) -> None:
    table = colour_table(tmp_path / "src")
    model = make_model("vit")
    scorer = CrossFitScorer(model, folds=3, alpha=10.0, batch_size=4)
    first = curate(str(table), scorer=scorer, keep=0.5, out=tmp_path / "a", chunk_size=2, progress=False)
    data = load_pairs(table)
    ids = np.arange(len(data)) // 2  # two captions per image, image by image
    for k, ridge in enumerate(scorer.maps):  # fold k's map is the plain fit on every other fold's pairs
        others = data.select(np.flatnonzero(scorer.fold != k))
        assert set(ids[scorer.fold == k]).isdisjoint(ids[scorer.fold != k])  # folds split by image
        direct = RidgeMap.fit(*_ridge_inputs(pair_features(model, others, batch_size=4)), alpha=10.0)
        torch.testing.assert_close(ridge.weight, direct.weight, atol=1e-4, rtol=1e-4)
    a = pq.read_table(first.scores).column("score").to_numpy()
    assert np.isfinite(a).all() and np.abs(a).max() <= 1 + 1e-5
    assert first.summary["scorer"].startswith("crossfit:") and "folds=3" in first.summary["scorer"]
    second = curate(str(table), scorer=CrossFitScorer(model, folds=3, alpha=10.0, batch_size=4), keep=0.5,
                    out=tmp_path / "b", chunk_size=50, progress=False)
    np.testing.assert_allclose(a, pq.read_table(second.scores).column("score").to_numpy(), atol=1e-5)
    # A rerun reads the saved features and scores: a scorer that cannot embed gives the same output.
    (tmp_path / "a" / "chunks" / "chunk-00001.parquet").unlink()
    blind = CrossFitScorer(model, folds=3, alpha=10.0, batch_size=4)
    blind.model = None  # embedding anything would raise
    again = curate(str(table), scorer=blind, keep=0.5, out=tmp_path / "a", chunk_size=2, progress=False)
    assert pq.read_table(again.scores).equals(pq.read_table(first.scores))
    with pytest.raises(lilt.errors.DataError, match="folds"):
        curate(str(table), scorer=CrossFitScorer(model, folds=9), keep=0.5, out=tmp_path / "c", progress=False)


def _ridge_inputs(features) -> tuple[torch.Tensor, torch.Tensor]:
    return features.images[features.text_image], torch.nn.functional.normalize(features.texts, dim=-1)


def test_data_curate_keeps_the_best_training_pairs_and_leaves_validation(tmp_path: Path, make_model) -> None:
    table = pair_table(tmp_path / "src", n=12)
    model = make_model("vit")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "src" / "val.csv").write_text(table.read_text())
    config = DataConfig(source=str(table), val_source=str(tmp_path / "src" / "val.csv"),
                        curate=CurateConfig(scorer=f"model:{tmp_path / 'model'}", keep=0.25, out=str(tmp_path / "c")))
    train, val, _ = resolve_data(config, None, seed=0)
    scores = pq.read_table(tmp_path / "c" / "scores.parquet").to_pandas()
    assert len(train) == 3 and len(val) == 12
    assert sorted(train["text"]) == sorted(scores[scores["kept"]]["text"])


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 1.5, -0.1])
def test_keep_outside_the_unit_interval_is_one_line_error(tmp_path: Path, capsys, keep: float) -> None:
    table = pair_table(tmp_path / "src")
    assert main(["curate", "--data", str(table), "--keep", str(keep), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"keep={keep}" in err and "(0, 1]" in err
    with pytest.raises(ConfigError, match="data.curate.keep"):
        CurateConfig(keep=keep)


def test_unknown_scorer_and_misplaced_noise_are_one_line_errors(tmp_path: Path, capsys) -> None:
    table = pair_table(tmp_path / "src")
    assert main(["curate", "--data", str(table), "--scorer", "clip", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown scorer 'clip'" in err and "model:DIR" in err
    assert main(["curate", "--data", str(table), "--noise", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "builtin:emoji-cldr only" in capsys.readouterr().err
    assert main(["curate", "--data", str(table), "--scorer", "frozen", "--out", str(tmp_path / "o")]) == 2  # untrusted
    assert "--trusted" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="scorer='bogus'"):
        CurateConfig(scorer="bogus")
    with pytest.raises(ConfigError, match="streamed"):
        DataConfig.from_dict({"source": "x.parquet", "streaming": True, "curate": {"keep": 0.4}})
    parsed = DataConfig.from_dict({"curate": {"keep": 0.3, "per_lang": True}}).curate
    assert parsed == CurateConfig(keep=0.3, per_lang=True)


def test_histogram_with_many_per_language_cuts_marks_each_as_a_tick(tmp_path: Path) -> None:
    from lilt.curation_report import plot_scores

    scores = np.linspace(-1, 1, 400)
    langs = np.arange(400) % 40
    per = {f"l{i}": {"cut": float(np.quantile(scores[langs == i], 0.6))} for i in range(40)}
    summary = {"cut": None, "per_language": per, "keep": 0.4, "kept": 160, "pairs": 400}
    path = plot_scores(scores, scores > 0.2, None, summary, tmp_path / "histogram.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
