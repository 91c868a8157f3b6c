"""benchmarks/scaling_down.py: its rows are valid recipes, rows resume from disk, the report, a smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("scaling_down", REPO / "benchmarks" / "scaling_down.py")
scaling = importlib.util.module_from_spec(spec)
sys.modules["scaling_down"] = scaling  # dataclasses look their module up while the file runs
spec.loader.exec_module(scaling)

from benchmarks._bench import DEMO, EVAL_LANGS, load_results, row_file, save_result  # noqa: E402  (on the path now)
from lilt.recipe import Recipe  # noqa: E402


def _result(row: str, seed: int, en: float, pairs: dict | None = None, noisy: float | None = None) -> dict:
    names = {r.name: r for r in scaling.rows()}
    test = {lang: {"i2t": en + i, "t2i": en - i} for i, lang in enumerate(EVAL_LANGS)}
    out = {"row": row, "group": names[row].group, "seed": seed, "trainable_percent": 1.9, "seconds": 200.0 + seed,
           "train_pairs": pairs or dict(scaling.TRAIN_PAIRS), "val": {"mean_recall": 40.0}, "test": test,
           "train_split": {"en": {"i2t": en + 70, "t2i": en + 70}}, "zero_pair": {"i2t": 8.0, "t2i": 7.0}}
    if noisy is not None:
        out["noisy_share"] = noisy
    return out


def _write(out: Path, result: dict, quick: bool = False) -> None:
    save_result(row_file(out, result["row"], result["seed"], quick), result)


def test_every_row_is_a_valid_demo_recipe_and_listed_once(capsys) -> None:
    every = scaling.rows()
    assert len({r.name for r in every}) == len(every)
    for row in every:  # a misspelt key or value would only fail hours into a full run
        Recipe.from_file(DEMO, list(row.overrides))
    assert scaling.share(0.25) == "data.pairs_per_lang={en: 232, sw: 38, yo: 38}"
    assert scaling.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(every) and "noisy-curated20" in listed[[r.name for r in every].index("noisy-curated20")]


def test_rows_by_name_or_group_lr_rows_first_and_the_quick_set() -> None:
    chosen = [r.name for r in scaling.select("size,lr", quick=False)]
    grid = (("lwa", (3e-4, 1e-3, 3e-3)), ("layernorm", (3e-4, 1e-3, 3e-3, 1e-2)))  # claims.py's grid, shared
    assert chosen[:7] == [f"lr-{p}-{lr:g}" for p, lrs in grid for lr in lrs]
    assert chosen[7:] == ["lwa-25", "lwa-50", "layernorm-25", "layernorm-50", "layernorm"]
    assert [r.name for r in scaling.select(None, quick=True)] == scaling.QUICK
    with pytest.raises(SystemExit, match="unknown rows or groups \\['noisyy'\\]"):
        scaling.select("noisyy", quick=False)


def test_finished_rows_are_skipped(tmp_path: Path, monkeypatch) -> None:
    ran: list[tuple[str, int]] = []

    class FakeBench:
        def __init__(self, quick: bool, out: Path) -> None:
            assert not quick

        def run(self, row, seed: int, lrs: dict) -> dict:
            ran.append((row.name, seed))
            return _result(row.name, seed, 20.0)

    monkeypatch.setattr(scaling, "ScalingBench", FakeBench)
    _write(tmp_path, _result("lwa", 0, 22.0))
    argv = ["--rows", "lwa,noisy", "--seeds", "0,1", "--out", str(tmp_path), "--results", str(tmp_path)]
    assert scaling.main(argv) == 0
    assert ran == [("lwa", 1), ("noisy", 0), ("noisy", 1)]  # lwa seed 0 was on disk
    assert json.loads(row_file(tmp_path, "lwa", 0, False).read_text())["test"]["en"]["i2t"] == 22.0
    ran.clear()
    assert scaling.main(argv) == 0 and ran == []


def test_report_from_row_files(tmp_path: Path) -> None:
    for seed, en in ((0, 20.0), (1, 26.0), (2, 23.0)):
        _write(tmp_path, _result("lwa", seed, en))
    _write(tmp_path, _result("noisy", 0, 15.0, noisy=0.3))
    _write(tmp_path, _result("noisy-curated40", 0, 18.0, pairs={"en": 420, "sw": 40, "yo": 30}, noisy=0.12))
    _write(tmp_path, _result("lwa-25", 0, 12.0, pairs={"en": 232, "sw": 38, "yo": 38}))
    flip = {"model": "vit_tiny_patch16_224", "ratio": 0.5, "batch_size": 16, "threads": 1, "speedup": 2.14,
            "samples_per_s": {"0": 10.0, "0.5": 21.4}}
    save_result(row_file(tmp_path, "flip-speed", 0, False),
                {"row": "flip-speed", "group": "slip", "seed": 0, "flip": flip, "seconds": 30.0})
    text = scaling.report(tmp_path, quick=False, results=tmp_path)
    assert "| lwa | 1226 | 0 | 23.0 (20.0-26.0) | 23.0 (20.0-26.0) | 24.0 (21.0-27.0) |" in text
    assert "| noisy | 1226 | 30.0 | 15.0 |" in text and "| noisy-curated40 | 490 | 12.0 | 18.0 |" in text
    assert "## Data size" in text and "| lwa-25 | 308 |" in text
    assert "## Augmentation" not in text  # lwa alone compares nothing
    assert "10.0 samples/s at mask ratio 0, 21.4 at 0.5, 2.14x" in text
    summary = json.loads((tmp_path / "scaling_down.json").read_text())["rows"]
    assert summary["noisy-curated40"]["noisy_share"]["mean"] == 0.12
    assert (tmp_path / "scaling_down.md").read_text().strip() == text.strip()
    assert (tmp_path / "scaling_down.png").stat().st_size > 1000


@pytest.mark.slow
def test_smoke_run_on_tiny_towers(tmp_path: Path, tiny_dirs: dict[str, Path], capsys) -> None:
    """Every kind of row (ridge, curated, augmented, SLIP, FLIP speed) runs end to end in 2 steps, then resumes."""
    names = "ridge-noisy-curated40,noisy-curated40,aug-none-50,slip-25,flip-speed"
    argv = ["--quick", "--rows", names, "--out", str(tmp_path / "rows"), "--results", str(tmp_path),
            "--smoke-towers", str(tiny_dirs["vit"]), str(tiny_dirs["bert"])]
    assert scaling.main(argv) == 0
    found = load_results(tmp_path / "rows", quick=True)
    assert sorted(found) == sorted(names.split(","))
    for name in ("ridge-noisy-curated40", "noisy-curated40"):
        result = found[name][0]
        assert 489 <= sum(result["train_pairs"].values()) <= 491  # 40% of 1226
        assert 0 <= result["noisy_share"] <= 1 and set(EVAL_LANGS) <= set(result["test"])
    assert found["aug-none-50"][0]["train_pairs"] == {"en": 463, "sw": 75, "yo": 75}
    assert found["slip-25"][0]["train_pairs"] == {"en": 232, "sw": 38, "yo": 38}
    assert found["flip-speed"][0]["flip"]["speedup"] > 0
    assert "## Noisy captions" in (tmp_path / "scaling_down-quick.md").read_text()
    capsys.readouterr()
    assert scaling.main(argv) == 0
    assert "seed 0 ..." not in capsys.readouterr().out  # everything was on disk
