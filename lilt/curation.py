"""Data curation: score every image-text pair, keep the best fraction ("Scaling (Down) CLIP", Wang et al. 2023).

A smaller set of well-matched pairs trains better than all of a noisy one. `curate` scores each pair by the
cosine of its image and caption embeddings under a scorer (`lilt.curation_scorers`) - the frozen packaged
towers joined by ridge maps fitted on the pairs themselves by folds (`crossfit`, the default, no training and
no trusted set needed) or on trusted pairs (`frozen`), a trained model (`model:DIR`), or any callable
`(images, texts) -> scores` - and keeps the top `keep` fraction, over all pairs or within each language.

Rows are scored in chunks that never split an image's captions, so each distinct image is embedded once
and memory stays bounded; each finished chunk's scores are written to `OUT/chunks/` atomically, and a rerun
(after a crash or kill) scores only the chunks still missing, giving the same output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ._io import atomic_path, write_json
from .curation_scorers import (SCORERS_HELP, CallableScorer, CrossFitScorer, FrozenScorer,  # noqa: F401 (API)
                               ModelScorer, fingerprint, make_scorer, trusted_pairs)
from .errors import ConfigError, DataError
from .data.identity import image_ids

logger = logging.getLogger(__name__)


@dataclass
class CurationResult:
    """What `curate` wrote and measured."""

    out: Path
    kept: Path
    scores: Path
    summary: dict[str, Any]


# -- chunked, resumable scoring ---------------------------------------------------------------------
def plan_chunks(data: datasets.Dataset, chunk_size: int) -> list[np.ndarray]:
    """Row numbers per chunk: rows grouped by image (first appearance order), about chunk_size rows each."""
    ids = image_ids(data)
    order = np.argsort(ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(ids[order]) != 0])  # where each image's rows begin
    chunks, begin = [], 0
    for start in starts[1:]:
        if start - begin >= chunk_size:
            chunks.append(order[begin:start])
            begin = start
    chunks.append(order[begin:])
    return [c for c in chunks if len(c)]


def score_pairs(data: datasets.Dataset, scorer: Any, folder: Path, chunk_size: int = 2048,
                progress: bool = True) -> np.ndarray:
    """Every row's score, chunk by chunk; finished chunks are saved in `folder` and reused on a rerun."""
    chunks = plan_chunks(data, chunk_size)
    plan = {"scorer": scorer.key, "data": fingerprint(data), "rows": len(data), "chunk_size": chunk_size}
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        logger.warning("%s holds scores of other data or another scorer; scoring afresh", folder)
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    write_json(plan_file, plan)
    prepare = getattr(scorer, "prepare", None)  # a scorer fitted on the data itself (crossfit) sees it all first
    if prepare is not None:
        prepare(data, chunks, folder, progress)
    scores = np.full(len(data), np.nan)
    bar = tqdm(total=len(data), desc="scoring pairs", unit="pair", disable=not progress)
    for index, rows in enumerate(chunks):
        file = folder / f"chunk-{index:05d}.parquet"
        if not file.exists():
            values = scorer.score(index, rows) if prepare is not None else scorer(data.select(rows))
            with atomic_path(file) as tmp:
                pq.write_table(pa.table({"row": rows, "score": np.asarray(values, dtype=np.float64)}), tmp)
        saved = pq.read_table(file)
        scores[saved["row"].to_numpy()] = saved["score"].to_numpy(zero_copy_only=False)
        bar.update(len(rows))
    bar.close()
    return scores


# -- selection and outputs -------------------------------------------------------------------------
def select_top(scores: np.ndarray, langs: Sequence[str] | None, keep: float, per_lang: bool) -> np.ndarray:
    """A boolean mask of the kept rows: the top `keep` share (at least one) overall or within each language.

    Unreadable pairs (NaN) rank last; ties go to the earlier row, so the choice is deterministic.
    """
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    groups = [np.arange(len(scores))] if not per_lang or langs is None else \
        [np.flatnonzero(np.asarray(langs) == lang) for lang in sorted(set(langs))]
    kept = np.zeros(len(scores), dtype=bool)
    for rows in groups:
        count = max(1, int(round(keep * len(rows))))
        order = rows[np.lexsort((rows, -ranked[rows]))]
        kept[order[:count]] = True
    return kept


def check_keep(keep: Any) -> float:
    """The kept share as a float in (0, 1], or a ConfigError naming it."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"keep={keep!r} must be a fraction in (0, 1] (0.4 keeps the best 40% of pairs).")
    return float(keep)


def curate(data: Any, scorer: Any = "frozen", keep: float = 0.4, out: str | os.PathLike = "curated", *,
           per_lang: bool = False, langs: Sequence[str] | None = None, noise: float = 0.0, trusted: Any = None,
           split: str = "train", batch_size: int = 64, chunk_size: int = 2048, progress: bool = True,
           **options: Any) -> CurationResult:
    """Score every pair of `data` (a spec or a table), keep the top `keep` share, write kept.parquet and a report.

    `noise` (builtin:emoji-cldr only) re-pairs that share of captions with wrong images first, so the report
    can say how many of them curation removed. See the module docstring for scorers and resumption.
    """
    from .data import load_pairs
    from .curation_report import write_outputs

    keep = check_keep(keep)
    if chunk_size < 1 or batch_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} and batch_size={batch_size} must be >= 1.")
    source = str(data) if isinstance(data, (str, os.PathLike)) else None
    if noise:
        if not (source or "").startswith("builtin:emoji-cldr"):
            raise ConfigError(f"noise={noise} simulates noisy pairs on builtin:emoji-cldr only; {source or 'a table'} "
                              "is not it (a table of your own may carry a boolean `noisy` column instead).")
        options["noise"] = noise
    if source is not None:
        data = load_pairs(source, split, langs=langs, **options)
    elif langs:
        wanted = set(langs)
        data = data.filter(lambda b: [x in wanted for x in b["lang"]], batched=True)
    if not isinstance(data, datasets.Dataset) or "text" not in data.column_names or not len(data):
        raise DataError(f"curation needs a non-empty map-style table of pairs (image, text); got {data!r}.")
    scorer = make_scorer(scorer, trusted, source, batch_size, langs)
    out = Path(out)
    scores = score_pairs(data, scorer, out / "chunks", chunk_size, progress)
    pair_langs = data["lang"] if "lang" in data.column_names else None
    kept = select_top(scores, pair_langs, keep, per_lang)
    summary = write_outputs(data, scores, kept, out, keep=keep, per_lang=per_lang, scorer=scorer.key,
                            source=source)
    return CurationResult(out, out / "kept.parquet", out / "scores.parquet", summary)


def curate_table(data: datasets.Dataset, config: Any, source: str, trusted: Any,
                 langs: Sequence[str] | None = None) -> datasets.Dataset:
    """The kept rows of a training table under a DataConfig's `curate` section (all its columns preserved)."""
    if not isinstance(data, datasets.Dataset):
        raise ConfigError("data.curate scores a map-style table; it cannot curate a stream (set data.streaming: "
                          "false, or curate once with `lilt curate` and train on its kept.parquet).")
    out = Path(config.out) if config.out else None
    with tempfile.TemporaryDirectory(prefix="lilt-curate-") as scratch:
        folder = out or Path(scratch)
        scorer = make_scorer(config.scorer, config.trusted or trusted, source, config.batch_size, langs)
        scores = score_pairs(data, scorer, folder / "chunks", config.chunk_size, progress=False)
        pair_langs = data["lang"] if "lang" in data.column_names else None
        kept = select_top(scores, pair_langs, config.keep, config.per_lang)
        if out is not None:
            from .curation_report import write_outputs

            write_outputs(data, scores, kept, out, keep=config.keep, per_lang=config.per_lang, scorer=scorer.key,
                          source=source)
    logger.info("data.curate kept %d of %d training pairs (scorer %s)", int(kept.sum()), len(data), scorer.key)
    return data.select(np.flatnonzero(kept))
