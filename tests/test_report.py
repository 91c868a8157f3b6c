"""Evaluation reports: rows, Markdown, JSON and PNG files, and comparison of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lilt.eval.report import (compare_runs, markdown_table, plot_by_language, plot_vs_trainable, report_rows,
                              write_report)

RETRIEVAL = {  # the shape retrieval_by_lang returns: pooled 'all' first, then languages with their counts
    "all": {"i2t/R@1": 30.04, "t2i/R@1": 28.0, "i2t/R@5": 61.26, "t2i/R@5": 60.0, "i2t/R@10": 75.0, "t2i/R@10": 74.95,
            "mean_recall": 54.875},
    "en": {"i2t/R@1": 40.0, "t2i/R@1": 38.0, "i2t/R@5": 70.0, "t2i/R@5": 69.0, "i2t/R@10": 80.0, "t2i/R@10": 79.0,
           "mean_recall": 62.67, "images": 10, "texts": 10},
    "sw": {"i2t/R@1": 20.0, "t2i/R@1": 18.0, "i2t/R@5": 50.0, "t2i/R@5": 51.0, "i2t/R@10": 70.0, "t2i/R@10": 71.0,
           "mean_recall": 46.67, "images": 10, "texts": 10},
}
ZEROSHOT = {"en": {"top1": 55.55, "top5": 90.0}, "all": {"top1": 50.0, "top5": 88.88}, "yo": {"top1": 44.44,
                                                                                              "top5": 86.0}}


def rows_for(model: str = "e5+lite0", scale: float = 1.0, trainable: float = 1.9) -> list[dict]:
    """Retrieval rows of one fake run; `scale` shifts its numbers so runs differ."""
    results = {lang: {k: v * scale if k.startswith(("i2t", "t2i")) else v for k, v in m.items()}
               for lang, m in RETRIEVAL.items()}
    return report_rows(results, dataset="builtin:emoji-cldr", task="retrieval", model=model,
                       extra={"trainable_percent": trainable, "plan": "lwa"})


def test_report_rows_are_flat_per_language():
    rows = rows_for()
    assert [r["language"] for r in rows] == ["all", "en", "sw"]
    assert rows[1] == {"dataset": "builtin:emoji-cldr", "task": "retrieval", "model": "e5+lite0", "language": "en",
                       "metrics": RETRIEVAL["en"], "trainable_percent": 1.9, "plan": "lwa"}
    with pytest.raises(ValueError, match="language"):
        report_rows(RETRIEVAL, dataset="d", task="retrieval", model="m", extra={"language": "en"})


def test_markdown_table_languages_as_rows_pooled_last():
    table = markdown_table(rows_for())
    assert table.splitlines() == [
        "| lang | i2t/R@1 | i2t/R@5 | i2t/R@10 | t2i/R@1 | t2i/R@5 | t2i/R@10 | images | texts |",
        "|---|---|---|---|---|---|---|---|---|",
        "| en | 40.0 | 70.0 | 80.0 | 38.0 | 69.0 | 79.0 | 10 | 10 |",
        "| sw | 20.0 | 50.0 | 70.0 | 18.0 | 51.0 | 71.0 | 10 | 10 |",
        "| all | 30.0 | 61.3 | 75.0 | 28.0 | 60.0 | 75.0 | - | - |",
    ]
    assert markdown_table(rows_for(), ["t2i/R@1", "images"]).splitlines()[2:] == [
        "| en | 38.0 | 10 |", "| sw | 18.0 | 10 |", "| all | 28.0 | - |"]


def test_markdown_table_zeroshot_defaults_to_top1_top5():
    rows = report_rows(ZEROSHOT, dataset="cifar10", task="zeroshot", model="m")
    assert markdown_table(rows).splitlines() == ["| lang | top1 | top5 |", "|---|---|---|", "| en | 55.5 | 90.0 |",
                                                 "| yo | 44.4 | 86.0 |", "| all | 50.0 | 88.9 |"]


def test_markdown_table_several_models_one_column_each():
    rows = rows_for("frozen", 0.5) + rows_for("tuned")
    lines = markdown_table(rows, ["i2t/R@1", "t2i/R@1"]).splitlines()
    assert lines[0] == "| lang | frozen i2t/R@1 | frozen t2i/R@1 | tuned i2t/R@1 | tuned t2i/R@1 |"
    assert lines[2] == "| en | 20.0 | 19.0 | 40.0 | 38.0 |"
    with pytest.raises(ValueError, match="two rows"):
        markdown_table(rows_for() + rows_for())


def test_write_report_round_trip(tmp_path: Path):
    rows = rows_for()
    paths = write_report(rows, tmp_path / "out")
    assert paths == {"json": tmp_path / "out" / "eval.json", "md": tmp_path / "out" / "eval.md",
                     "png": tmp_path / "out" / "eval.png"}
    assert json.loads(paths["json"].read_text()) == rows
    assert paths["md"].read_text() == markdown_table(rows)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md", "eval.png"]  # no temps
    (tmp_path / "plain.txt").write_text("x")  # written atomically, yet with the mode any new file gets (umask)
    assert {p.stat().st_mode for p in paths.values()} == {(tmp_path / "plain.txt").stat().st_mode}


def test_zeroshot_report_plots_top1(tmp_path: Path):
    paths = write_report(report_rows(ZEROSHOT, dataset="cifar10", task="zeroshot", model="m"), tmp_path, name="zs")
    assert paths["png"].name == "zs.png" and paths["png"].stat().st_size > 5_000


def test_plots_several_models_and_trainable_fraction(tmp_path: Path):
    rows = rows_for("frozen", 0.5, trainable=0.1) + rows_for("lwa", trainable=1.9) + rows_for("full", 1.2, 100.0)
    bars = plot_by_language(rows, tmp_path / "bars.png", metric="t2i/R@5")
    assert bars.stat().st_size > 5_000
    scatter = plot_vs_trainable(rows, tmp_path / "scatter.png")
    assert scatter.stat().st_size > 5_000
    with pytest.raises(ValueError, match="no row has metric 'R@1'.*i2t/R@1"):
        plot_by_language(rows, tmp_path / "x.png", metric="R@1")
    with pytest.raises(ValueError, match="run 'm' has trainable_percent=None"):
        plot_vs_trainable(report_rows(RETRIEVAL, dataset="d", task="retrieval", model="m"), tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_compare_runs_side_by_side(tmp_path: Path):
    write_report(rows_for("e5+lite0", 0.5), tmp_path / "heads")
    write_report(rows_for("e5+lite0"), tmp_path / "lwa")
    table, merged = compare_runs([tmp_path / "heads", tmp_path / "lwa"], metric="t2i/R@1")
    assert table.splitlines() == ["| lang | heads t2i/R@1 | lwa t2i/R@1 |", "|---|---|---|", "| en | 19.0 | 38.0 |",
                                  "| sw | 9.0 | 18.0 |", "| all | 14.0 | 28.0 |"]
    assert [r["run"] for r in merged] == ["heads"] * 3 + ["lwa"] * 3
    assert merged[3] == {**rows_for("e5+lite0")[0], "run": "lwa"}


def test_compare_runs_missing_eval_names_run_and_command(tmp_path: Path):
    write_report(rows_for(), tmp_path / "lwa")
    (tmp_path / "lora").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run 'lora' has no eval.json.*lilt eval --model DIR --data SPEC"):
        compare_runs([tmp_path / "lwa", tmp_path / "lora"])
