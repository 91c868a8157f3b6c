"""Evaluation reports: flat JSON rows, a Markdown table and PNG plots, and side-by-side comparison of runs.

A row is one language of one evaluation, in the spirit of CLIP_benchmark's output
({"dataset", "model", "pretrained", "task", "metrics": {...}, "language"}):
{"dataset", "task", "model", "language", "metrics": {...}} plus any extra fields (trainable_percent, plan,
pretrained, run, ...). A list of rows is what `write_report` saves as `<name>.json` and `compare_runs` reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._io import atomic_path, write_text

# Default table columns, in this order, among those the rows have (retrieval, then classification).
# Counts close the row: a language with 2 test images has a much easier R@1 than one with 463.
DEFAULT_METRICS = ("i2t/R@1", "i2t/R@5", "i2t/R@10", "t2i/R@1", "t2i/R@5", "t2i/R@10", "top1", "top5", "images",
                   "texts", "classes")
# Pooled results come after the per-language ones.
POOLED = ("all", "mean")
EVAL_FILE = "eval.json"


def report_rows(results: Mapping[str, Mapping[str, float]], *, dataset: str, task: str, model: str,
                extra: Mapping[str, Any] | None = None) -> list[dict]:
    """One flat row per language of `results` (language -> metrics, e.g. `retrieval_by_lang`'s output)."""
    reserved = {"dataset", "task", "model", "language", "metrics"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra fields {sorted(reserved)} would overwrite a row's own fields; rename them")
    return [{"dataset": dataset, "task": task, "model": model, "language": lang, "metrics": dict(metrics),
             **(extra or {})} for lang, metrics in results.items()]


def row_series(row: Mapping[str, Any]) -> str:
    """What tells a row's evaluation apart from others in one table or plot: its run name, else its model."""
    return str(row.get("run") or row["model"])


def languages(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Languages in first-seen order, the pooled ones ('all', 'mean') last."""
    seen = list(dict.fromkeys(row["language"] for row in rows))
    return [lang for lang in seen if lang not in POOLED] + [lang for lang in POOLED if lang in seen]


def default_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The usual columns the rows have (R@K both directions, or top1/top5), else all their numeric metrics."""
    present = dict.fromkeys(key for row in rows for key, value in row["metrics"].items()
                            if isinstance(value, (int, float)))
    chosen = [m for m in DEFAULT_METRICS if m in present]
    return chosen or list(present)


def _cell(value: Any) -> str:
    """A number to 1 decimal (counts as integers); '-' when the row lacks it."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Languages as rows, metrics as columns ('<run> <metric>' per run when rows come from several)."""
    if not rows:
        raise ValueError("no rows to tabulate")
    metrics = list(metrics) if metrics is not None else default_metrics(rows)
    series = list(dict.fromkeys(row_series(row) for row in rows))
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (row_series(row), row["language"])
        if key in cells:
            raise ValueError(f"two rows for run/model {key[0]!r}, language {key[1]!r}; give each run a distinct 'run'")
        cells[key] = row["metrics"]
    if len(series) == 1:
        columns = [(series[0], m, m) for m in metrics]
    else:  # several runs: each header names its run and its metric (report.md is read without the command)
        columns = [(s, m, f"{s} {m}") for s in series for m in metrics]
    lines = ["| lang | " + " | ".join(header for _, _, header in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for lang in languages(rows):
        values = [_cell(cells.get((s, lang), {}).get(m)) for s, m, _ in columns]
        lines.append(f"| {lang} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    """Write text atomically."""
    return write_text(path, text)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, works with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically as PNG and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)
    return Path(path)


def _require_metric(rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Raise when no row has `metric`, naming the ones they have."""
    if not any(metric in row["metrics"] for row in rows):
        raise ValueError(f"no row has metric {metric!r}; they have: {', '.join(default_metrics(rows)) or 'none'}")


def plot_by_language(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "i2t/R@1") -> Path:
    """Bar chart of `metric` per language, one bar per run/model in each language's group; saved as PNG."""
    _require_metric(rows, metric)
    plt = _pyplot()
    langs, series = languages(rows), list(dict.fromkeys(row_series(row) for row in rows))
    value = {(row_series(row), row["language"]): row["metrics"].get(metric, math.nan) for row in rows}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(langs) * max(1, len(series) ** 0.5)), 4.0))
    for i, name in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(langs))]
        heights = [value.get((name, lang), math.nan) for lang in langs]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, ["" if math.isnan(h) else f"{h:.1f}" for h in heights], fontsize=7)
    ax.set_xticks(range(len(langs)), langs)
    ax.set_xlabel("language")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per language" + (f" - {rows[0]['dataset']}" if "dataset" in rows[0] else ""))
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_vs_trainable(runs: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "i2t/R@1",
                      language: str = "all") -> Path:
    """Scatter of `metric` vs % trainable parameters (log x), one labelled point per run, from its `language` row."""
    points = [row for row in runs if row.get("language", language) == language]
    if not points:
        raise ValueError(f"no run has a row for language {language!r}")
    _require_metric(points, metric)
    for row in points:
        percent = row.get("trainable_percent")
        if not isinstance(percent, (int, float)) or percent <= 0:
            raise ValueError(f"run {row_series(row)!r} has trainable_percent={percent!r}; a positive number is needed "
                             f"for a log axis (pass extra={{'trainable_percent': ...}} to report_rows)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    xs = [row["trainable_percent"] for row in points]
    ys = [row["metrics"].get(metric, math.nan) for row in points]
    ax.scatter(xs, ys)
    for x, y, row in zip(xs, ys, points):
        ax.annotate(row_series(row), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel(f"{metric} (%), language {language}")
    ax.set_title(f"{metric} vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "eval") -> dict[str, Path]:
    """Write `<name>.json` (the rows), `<name>.md` (the table) and `<name>.png` (first column per language)."""
    out_dir = Path(out_dir)
    metric = default_metrics(rows)[0] if rows else None
    if metric is None:
        raise ValueError("no rows, or no numeric metric in them, to report")
    # default=str: extra fields such as paths still serialize rather than failing after the evaluation ran.
    return {"json": _write_text(out_dir / f"{name}.json", json.dumps(list(rows), indent=1, default=str) + "\n"),
            "md": _write_text(out_dir / f"{name}.md", markdown_table(rows)),
            "png": plot_by_language(rows, out_dir / f"{name}.png", metric)}


def compare_runs(run_dirs: Sequence[str | Path], metric: str = "i2t/R@1") -> tuple[str, list[dict]]:
    """Side-by-side Markdown table of `metric` (languages x runs) from each run's eval.json, and the merged rows."""
    run_dirs = [Path(d) for d in run_dirs]
    names = [d.name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):  # two runs called 'out' in different folders: label them by path
        names = [str(d) for d in run_dirs]
    merged = []
    for run_dir, run in zip(run_dirs, names):
        path = run_dir / EVAL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"run {run!r} has no {EVAL_FILE} ({path}); make it with "
                                    f"`lilt eval --model DIR --data SPEC --out {run_dir}`")
        merged += [{**row, "run": run} for row in json.loads(path.read_text(encoding="utf-8"))]
    _require_metric(merged, metric)
    return markdown_table(merged, [metric]), merged
