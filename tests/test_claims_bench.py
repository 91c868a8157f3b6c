"""benchmarks/claims.py's bookkeeping: rows resume from disk, lr chosen on validation, mean and range over seeds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("claims", REPO / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(spec)
sys.modules["claims"] = claims  # dataclasses look their module up while the file runs
spec.loader.exec_module(claims)


def _result(row: str, seed: int, en: float, val: float = 10.0, group: str = "method") -> dict:
    test = {lang: {"i2t": en + i, "t2i": en - i} for i, lang in enumerate(claims.EVAL_LANGS)}
    return {"row": row, "group": group, "seed": seed, "trainable_percent": 1.9, "val": {"mean_recall": val},
            "test": test, "train_split": {"en": {"i2t": en + 20, "t2i": en + 18}},
            "zero_pair": {"i2t": en, "t2i": en}, "conservation": {x: 50.0 + seed for x in claims.CONSERVE_LANGS}}


def _write(out: Path, result: dict) -> None:
    file = claims.row_file(out, result["row"], result["seed"], quick=False)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result))


def test_mean_and_range_over_seeds_and_the_report(tmp_path: Path) -> None:
    for seed, en in ((0, 20.0), (1, 26.0), (2, 23.0)):
        _write(tmp_path, _result("lwa", seed, en))
    _write(tmp_path, _result("ridge", 0, 21.0))
    summary = claims.summarize(claims.load_results(tmp_path, quick=False))
    s = summary["lwa"]["test"]["en"]["i2t"]
    assert (s["mean"], s["min"], s["max"], s["n"]) == (23.0, 20.0, 26.0, 3)
    assert claims.fmt(s) == "23.0 (20.0-26.0)" and claims.fmt(summary["ridge"]["test"]["en"]["i2t"]) == "21.0"
    text = claims.report(tmp_path, quick=False, results=tmp_path)
    assert "| lwa | 1.90 | 3 | 23.0 (20.0-26.0) |" in text and "| ridge | 1.90 | 1 | 21.0 |" in text
    assert (tmp_path / "claims.json").is_file() and (tmp_path / "claims.png").is_file()


def test_each_plan_takes_its_best_validation_lr(tmp_path: Path) -> None:
    for lr, val in ((0.0003, 30.0), (0.001, 35.0), (0.003, 31.0)):
        _write(tmp_path, _result(f"lr-lwa-{lr:g}", 0, 0.0, val=val, group="lr"))
    _write(tmp_path, _result("lr-full-1e-05", 0, 0.0, val=20.0, group="lr"))
    assert claims.chosen_lrs(claims.load_results(tmp_path, quick=False)) == {"lwa": 0.001, "full": 1e-05}


def test_rows_are_selected_by_name_or_group_lr_rows_first() -> None:
    chosen = [r.name for r in claims.select("lwa,lr", quick=False)]
    assert chosen[-1] == "lwa" and all(n.startswith("lr-") for n in chosen[:-1]) and len(chosen) == 26
    assert [r.name for r in claims.select(None, quick=True)] == ["ridge", "heads", "lwa", "lwa+parallel"]
    with pytest.raises(SystemExit, match="unknown rows or groups \\['lwaa'\\]"):
        claims.select("lwaa", quick=False)


def test_hubness_rows_report_each_seeds_gain_over_its_own_uncorrected_model(tmp_path: Path) -> None:
    for seed, gain in ((0, 0.5), (1, 1.5)):
        result = _result("lwa+hubness", seed, 20.0, group="lever")
        result["test_uncorrected"] = {x: {d: v - gain for d, v in s.items()} for x, s in result["test"].items()}
        result["levers"] = {"hubness_k": 10, "hubness_beta": 0.25 * (seed + 1)}
        _write(tmp_path, result)
    _write(tmp_path, _result("lwa", 0, 20.0))
    summary = claims.summarize(claims.load_results(tmp_path, quick=False))
    assert "scoring_gain" not in summary["lwa"]
    assert summary["lwa+hubness"]["scoring_gain"]["en i2t"] == pytest.approx(
        {"mean": 1.0, "min": 0.5, "max": 1.5, "n": 2})
    text = claims.report(tmp_path, quick=False, results=tmp_path)
    assert "| lwa+hubness | 2 | k 10 beta 0.25, k 10 beta 0.5 | +1.0 (+0.5..+1.5) |" in text


def test_translation_rows_name_the_mean_strength_per_language_and_the_weights(tmp_path: Path) -> None:
    for seed, (strength, weight) in enumerate(((0.5, 0.5), (1.0, 0.25))):
        result = _result("lwa+translate+ridge-ensemble", seed, 20.0, group="lever")
        result["test_uncorrected"] = {x: {d: v - 2.0 for d, v in s.items()} for x, s in result["test"].items()}
        maps = {"sw": {"alpha": 10.0, "strength": strength, "val": {}},
                "yo": {"alpha": 1.0, "strength": 0.0, "val": {}}}
        result["levers"] = {"translation": maps, "ridge_translation": maps, "ensemble_weight": weight}
        _write(tmp_path, result)
    text = claims.report(tmp_path, quick=False, results=tmp_path)
    assert ("| lwa+translate+ridge-ensemble | 2 | maps strength sw 0.75 yo 0; ridge-side maps strength sw 0.75 yo 0; "
            "w 0.5, 0.25 | +2.0 (+2.0..+2.0) |") in text
