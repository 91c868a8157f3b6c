"""Data curation: score every image-text pair, keep the best fraction ("Scaling (Down) CLIP", Wang et al. 2023).

A smaller set of well-matched pairs trains better than all of a noisy one. `curate` scores each pair by the
cosine of its image and caption embeddings under a scorer - the frozen packaged towers joined by a ridge map
fitted on trusted pairs (`frozen`, no training needed), a trained model (`model:DIR`), or any callable
`(images, texts) -> scores` - and keeps the top `keep` fraction, over all pairs or within each language.

Rows are scored in chunks that never split an image's captions, so each distinct image is embedded once
and memory stays bounded; each finished chunk's scores are written to `OUT/chunks/` atomically, and a rerun
(after a crash or kill) scores only the chunks still missing, giving the same output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._io import atomic_path, write_json
from .errors import ConfigError, DataError
from .data.identity import image_ids, image_keys
from .data.transforms import decode_image
from .eval.retrieval import embed_images

logger = logging.getLogger(__name__)
SCORERS_HELP = "'frozen' (packaged towers + ridge map on trusted pairs), 'model:DIR' (a trained lilt model), " \
               "or a callable (images, texts) -> scores"


@dataclass
class CurationResult:
    """What `curate` wrote and measured."""

    out: Path
    kept: Path
    scores: Path
    summary: dict[str, Any]


# -- scorers: each gives one score per row of a chunk (NaN where the image cannot be read) ---------------
class ModelScorer:
    """Cosine of a dual encoder's normalized image and caption embeddings (a trained lilt model)."""

    def __init__(self, model: Any, name: str = "model", batch_size: int = 64) -> None:
        self.model, self.key, self.batch_size = model.eval(), name, batch_size

    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of a preprocessed batch."""
        return F.normalize(self.model.encode_image(pixels.to(self.model.device)).float(), dim=-1)

    def text_vectors(self, texts: list[str]) -> torch.Tensor:
        """Unit caption embeddings of a batch of strings."""
        batch = {k: v.to(self.model.device) for k, v in self.model.tokenize(texts).items()}
        return F.normalize(self.model.encode_text(batch).float(), dim=-1)

    # What `embed_images` asks of a model, so the evaluation's readable-or-skipped image pass is reused.
    def image_transform(self, train: bool = False) -> Any:
        """The model's evaluation preprocessing."""
        return self.model.image_transform(train=False)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.device

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image vectors (for embed_images)."""
        return self.image_vectors(pixels)

    @torch.inference_mode()
    def __call__(self, chunk: datasets.Dataset) -> np.ndarray:
        """Scores of a chunk's rows: each distinct image embedded once, captions a batch at a time."""
        keys = image_keys(chunk)
        first: dict[Any, int] = {}
        unique_rows = [first.setdefault(k, row) for row, k in enumerate(keys) if k not in first]
        try:
            images, kept, _ = embed_images(self, chunk.select(unique_rows), batch_size=self.batch_size)
        except DataError:  # not one image of the chunk is readable: every row scores NaN
            return np.full(len(chunk), np.nan)
        slot = torch.full((len(unique_rows),), -1, dtype=torch.long)
        slot[kept] = torch.arange(len(images))
        position = {row: i for i, row in enumerate(unique_rows)}
        row_image = slot[[position[first[k]] for k in keys]]
        texts = chunk["text"]
        scores = torch.full((len(chunk),), float("nan"))
        for start in range(0, len(texts), self.batch_size):
            part = row_image[start:start + self.batch_size]
            ok = part >= 0
            if not bool(ok.any()):
                continue
            vectors = self.text_vectors([t or "" for t in texts[start:start + self.batch_size]])
            sims = (vectors * images[part.clamp_min(0)]).sum(-1)
            scores[start:start + len(part)] = torch.where(ok, sims, torch.tensor(float("nan")))
        return scores.numpy().astype(np.float64)


class FrozenScorer(ModelScorer):
    """Frozen towers' pooled features, images mapped into the text space by a ridge map fitted on trusted pairs."""

    def __init__(self, model: Any, trusted: datasets.Dataset, batch_size: int = 64, name: str = "frozen") -> None:
        from .baselines import fit_ridge, pair_features

        super().__init__(model, name, batch_size)
        if len(trusted) < 2:
            raise DataError(f"the frozen scorer fits its ridge map on trusted pairs; got {len(trusted)} (need a "
                            "few hundred clean pairs: --trusted SPEC).")
        self.ridge = fit_ridge(pair_features(model, trusted, batch_size=batch_size))
        towers = "+".join(str(getattr(getattr(model, side, None), "source", "?")) for side in ("vision", "text"))
        self.key = f"{name}:{towers}:trusted={_fingerprint(trusted)}"

    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ridge.embed_images(self.model.image_features(pixels.to(self.model.device)).float().cpu())

    def text_vectors(self, texts: list[str]) -> torch.Tensor:
        batch = {k: v.to(self.model.device) for k, v in self.model.tokenize(texts).items()}
        return self.ridge.embed_texts(self.model.text_features(batch).float().cpu())


class CallableScorer:
    """A user function `(images: list of PIL RGB images, texts: list of str) -> scores`, a batch at a time.

    Saved chunk scores are reused by a function of the same module and name: rename one whose scores change.
    """

    def __init__(self, function: Callable, batch_size: int = 64) -> None:
        self.function, self.batch_size = function, batch_size
        self.key = f"callable:{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', function)}"

    def __call__(self, chunk: datasets.Dataset) -> np.ndarray:
        """Scores of a chunk's rows (NaN for an unreadable image, which the function never sees)."""
        scores = np.full(len(chunk), np.nan)
        for start in range(0, len(chunk), self.batch_size):
            part = chunk[start:start + self.batch_size]
            images, rows = [], []
            for i, value in enumerate(part["image"]):
                try:
                    images.append(decode_image(value))
                    rows.append(start + i)
                except (OSError, ValueError):
                    continue
            if rows:
                out = np.asarray(self.function(images, [part["text"][r - start] for r in rows]), dtype=np.float64)
                if out.shape != (len(rows),):
                    raise DataError(f"the scorer {self.key} returned shape {out.shape} for {len(rows)} pairs; it must "
                                    "return one score per (image, text).")
                scores[rows] = out
        return scores


def make_scorer(scorer: Any, trusted: Any = None, source: str | None = None, batch_size: int = 64,
                langs: Sequence[str] | None = None) -> Any:
    """A scorer from 'frozen', 'model:DIR', a lilt model, a scorer object or a callable (see SCORERS_HELP)."""
    import lilt

    if isinstance(scorer, (ModelScorer, CallableScorer)):
        return scorer
    if isinstance(scorer, lilt.DualEncoder):
        return ModelScorer(scorer, batch_size=batch_size)
    if scorer == "frozen":
        clean = trusted_pairs(trusted, source, langs)  # before the towers load: a missing --trusted fails at once
        return FrozenScorer(lilt.DualEncoder.from_backbones(), clean, batch_size)
    if isinstance(scorer, str) and scorer.startswith("model:"):
        path = scorer[len("model:"):]
        if not Path(path).is_dir():
            raise ConfigError(f"scorer {scorer!r}: {path!r} is not a folder; give one written by lilt train or "
                              "save_pretrained.")
        return ModelScorer(lilt.DualEncoder.from_pretrained(path), f"model:{Path(path).resolve()}", batch_size)
    if callable(scorer) and not isinstance(scorer, str):
        return CallableScorer(scorer, batch_size)
    raise ConfigError(f"unknown scorer {scorer!r}; give {SCORERS_HELP}.")


def trusted_pairs(trusted: Any, source: str | None, langs: Sequence[str] | None = None) -> datasets.Dataset:
    """The frozen scorer's clean pairs: `trusted` (a spec or table), else a built-in source's validation split.

    A built-in spec without a split gives its validation split (never noised); a table or folder, its rows.
    """
    from .data import load_pairs

    if isinstance(trusted, datasets.Dataset):
        return trusted
    spec = str(trusted) if trusted is not None else source
    if spec is None or (trusted is None and not spec.startswith("builtin:")):
        raise ConfigError(f"the frozen scorer needs trusted (clean) pairs to fit its ridge map; {source or 'a table'} "
                          "is not a built-in with a clean validation split, so give --trusted SPEC "
                          "(data.curate.trusted).")
    if spec.startswith("builtin:"):
        return load_pairs(":".join(spec.split(":")[:2]), spec.split(":")[2] if spec.count(":") > 1 else "validation",
                          langs=langs)
    return load_pairs(spec, "train", langs=langs)


# -- chunked, resumable scoring ---------------------------------------------------------------------
def _fingerprint(data: datasets.Dataset) -> str:
    """A hash of a table's images and captions, to tell whether saved chunk scores belong to it."""
    digest = hashlib.sha1()
    for key in image_keys(data):
        digest.update(repr(key).encode())
    for text in data["text"]:
        digest.update(b"\0" + (text or "").encode())
    return digest.hexdigest()[:16]


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
    plan = {"scorer": scorer.key, "data": _fingerprint(data), "rows": len(data), "chunk_size": chunk_size}
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        logger.warning("%s holds scores of other data or another scorer; scoring afresh", folder)
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    write_json(plan_file, plan)
    scores = np.full(len(data), np.nan)
    bar = tqdm(total=len(data), desc="scoring pairs", unit="pair", disable=not progress)
    for index, rows in enumerate(chunks):
        file = folder / f"chunk-{index:05d}.parquet"
        if not file.exists():
            values = scorer(data.select(rows))
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
