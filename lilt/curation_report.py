"""What `lilt curate` leaves in its folder: kept.parquet (loadable), scores.parquet, histogram.png, summary.json.

kept.parquet names its images by paths relative to its own folder, under `images/` (hard links to the
source files where the file system allows, copies otherwise; embedded image bytes are written out), so
`load_pairs`' rule that a table's images lie under its folder holds and `lilt train
data.source=OUT/kept.parquet` reads it without `allow_outside_root`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._io import atomic_path, write_json

_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"RIFF", ".webp"), (b"BM", ".bmp"))


def write_outputs(data: datasets.Dataset, scores: np.ndarray, kept: np.ndarray, out: Path, *, keep: float,
                  per_lang: bool, scorer: str, source: str | None) -> dict[str, Any]:
    """Write the four outputs (each atomically) and return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    langs = np.asarray(data["lang"] if "lang" in data.column_names else ["-"] * len(data), dtype=object)
    noisy = np.asarray(data["noisy"], dtype=bool) if "noisy" in data.column_names else None
    images = data.select_columns(["image"]).with_format("arrow")[:]["image"].to_pylist()
    texts = data["text"]
    rows = np.flatnonzero(kept)
    local = _materialize([images[r] for r in rows], out / "images")
    table = {"image": local, "text": [texts[r] for r in rows], "lang": langs[rows].tolist(),
             "score": scores[rows]}
    if noisy is not None:
        table["noisy"] = noisy[rows]
    _write_parquet(pa.table(table), out / "kept.parquet")
    every = {"row": np.arange(len(data)), "image": [_label(v) for v in images], "text": texts,
             "lang": langs.tolist(), "score": scores, "kept": kept}
    if noisy is not None:
        every["noisy"] = noisy
    _write_parquet(pa.table(every), out / "scores.parquet")
    summary = summarize(scores, kept, langs, noisy, keep=keep, per_lang=per_lang)
    summary.update(source=source, scorer=scorer, outputs={name: str(out / name) for name in
                                                          ("kept.parquet", "scores.parquet", "histogram.png")})
    plot_scores(scores, kept, noisy, summary, out / "histogram.png")
    write_json(out / "summary.json", summary)
    return summary


def summarize(scores: np.ndarray, kept: np.ndarray, langs: np.ndarray, noisy: np.ndarray | None, *,
              keep: float, per_lang: bool) -> dict[str, Any]:
    """Counts, the cut (lowest kept score) overall and per language, and noise removal when noise is known."""
    def cut(mask: np.ndarray) -> float | None:
        values = scores[mask & kept & np.isfinite(scores)]
        return round(float(values.min()), 6) if len(values) else None

    def mean(mask: np.ndarray) -> float | None:
        values = scores[mask & np.isfinite(scores)]
        return round(float(values.mean()), 6) if len(values) else None

    everything = np.ones(len(scores), dtype=bool)
    summary: dict[str, Any] = {
        "keep": keep, "per_lang": per_lang, "pairs": int(len(scores)), "kept": int(kept.sum()),
        "discarded": int((~kept).sum()), "unreadable": int(np.isnan(scores).sum()),
        "cut": None if per_lang else cut(everything), "mean_score": mean(everything),
        "per_language": {str(lang): {"pairs": int((langs == lang).sum()), "kept": int((kept & (langs == lang)).sum()),
                                     "cut": cut(langs == lang), "mean_score": mean(langs == lang)}
                         for lang in sorted(set(langs.tolist()))}}
    if noisy is not None:
        discarded = ~kept
        summary["noise"] = {
            "noisy": int(noisy.sum()), "noisy_discarded": int((noisy & discarded).sum()),
            "noisy_kept": int((noisy & kept).sum()),
            # precision: of the pairs curation threw away, how many were noise; recall: of the noise, how much went
            "precision": round(float((noisy & discarded).sum() / max(1, discarded.sum())), 4),
            "recall": round(float((noisy & discarded).sum() / max(1, noisy.sum())), 4),
            "noisy_share_before": round(float(noisy.mean()), 4),
            "noisy_share_after": round(float(noisy[kept].mean()) if kept.any() else 0.0, 4)}
    return summary


def plot_scores(scores: np.ndarray, kept: np.ndarray, noisy: np.ndarray | None, summary: dict[str, Any],
                path: Path) -> Path:
    """A histogram of the scores (clean and noisy apart when known) with the cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.isfinite(scores)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores[finite], bins=50) if finite.any() else 10
    if noisy is not None:
        ax.hist([scores[finite & ~noisy], scores[finite & noisy]], bins=bins, stacked=True,
                label=["clean pairs", "noisy pairs (injected)"], color=["tab:blue", "tab:red"])
    else:
        ax.hist(scores[finite], bins=bins, color="tab:blue", label="pairs")
    cuts = {"cut": summary["cut"]} if summary["cut"] is not None else \
        {lang: v["cut"] for lang, v in summary["per_language"].items() if v["cut"] is not None}
    if len(cuts) <= 8:
        for i, (name, value) in enumerate(cuts.items()):
            ax.axvline(value, color="black", linestyle="--" if i == 0 else ":", linewidth=1.2,
                       label=f"{name} {value:.3f} (keep {summary['keep']:.0%})" if name == "cut" else f"cut {name}")
    else:  # a line per language would hide the bars: every cut as a tick along the top, their median as a line
        ax.plot(list(cuts.values()), [0.97] * len(cuts), "|", color="black", markersize=12,
                transform=ax.get_xaxis_transform(), label=f"per-language cuts ({len(cuts)} languages)")
        ax.axvline(float(np.median(list(cuts.values()))), color="black", linestyle=":", linewidth=1.2,
                   label="median per-language cut")
    ax.set_xlabel("image-text score (cosine)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{summary['kept']} of {summary['pairs']} pairs kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _label(value: Any) -> str:
    """How scores.parquet names an image: its path, or a hash of its bytes."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes"):
            return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
        return ""
    return str(value) if value is not None else ""


def _materialize(values: list[Any], folder: Path) -> list[str]:
    """Each image as a file under `folder` (a hard link or copy of its source, or its bytes written), by path."""
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for value in values:
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        blob = value.get("bytes") if isinstance(value, dict) else None
        if blob:
            digest = hashlib.sha1(blob).hexdigest()[:20]
            suffix = next((s for magic, s in _MAGIC if blob.startswith(magic)), ".img")
        elif path:
            digest = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:20]
            suffix = Path(path).suffix.lower() or ".img"
        else:
            names.append("")  # nothing to read: load_pairs' reader counts it as a bad item, like the source did
            continue
        target = folder / f"{digest}{suffix}"
        if not target.exists():
            _place(target, blob, Path(path) if path else None)
        names.append(f"{folder.name}/{target.name}")
    return names


def _place(target: Path, blob: bytes | None, source: Path | None) -> None:
    """Write `blob`, or hard-link `source`, at `target`; a copy where a link is refused."""
    if source is not None and not blob:
        # A hard link costs no space and stays inside the folder for load_pairs' containment check (a symlink
        # would resolve outside it); creating one is atomic. Across file systems the file is copied instead.
        try:
            os.link(source, target)
            return
        except FileExistsError:
            return
        except OSError:
            pass
    with atomic_path(target) as tmp:
        if blob:
            tmp.write_bytes(blob)
        else:
            shutil.copyfile(source, tmp)
