"""Scorers for `lilt.curation`: each gives one image-text score per row of a chunk of pairs (NaN where the
image cannot be read).

- `CrossFitScorer` ('crossfit', the default): the frozen packaged towers, images mapped into the text space
  by ridge maps fitted on the pairs being curated themselves, K ways by image; each pair is scored by the map
  fitted on the other folds, which never saw its image (out-of-sample scores, as in cleanlab's confident
  learning). It needs no trusted set and leaves the validation split out of what is kept.
- `FrozenScorer` ('frozen'): the same towers with one ridge map fitted on trusted (clean) pairs; by default a
  built-in's validation split - which then shapes what training keeps, so validation stops being neutral.
- `ModelScorer` ('model:DIR'): a trained lilt model's cosine. `CallableScorer`: any function.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._io import atomic_path
from .errors import ConfigError, DataError
from .data.identity import image_ids, image_keys
from .data.transforms import decode_image
from .eval.retrieval import embed_distinct_images, embed_texts

SCORERS_HELP = "'crossfit' (packaged towers + ridge maps fitted on the pairs themselves, by folds), 'frozen' " \
               "(packaged towers + a ridge map fitted on trusted pairs), 'model:DIR' (a trained lilt model), or " \
               "a callable (images, texts) -> scores"


def fingerprint(data: datasets.Dataset) -> str:
    """A hash of a table's images and captions, to tell whether saved chunk scores belong to it."""
    digest = hashlib.sha1()
    for key in image_keys(data):
        digest.update(repr(key).encode())
    for text in data["text"]:
        digest.update(b"\0" + (text or "").encode())
    return digest.hexdigest()[:16]


def embed_chunk_images(model: Any, chunk: datasets.Dataset, *, features: bool = False,
                       batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's distinct images embedded once, and each row's slot among them (-1: unreadable image)."""
    try:
        images, row_image, _ = embed_distinct_images(model, chunk, features=features, batch_size=batch_size)
    except DataError:  # not one image of the chunk is readable: every row gets no image
        return torch.zeros(0, 1), torch.full((len(chunk),), -1, dtype=torch.long)
    return images, row_image


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
        images, row_image = embed_chunk_images(self, chunk, batch_size=self.batch_size)
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
        self.key = f"{name}:{towers}:trusted={fingerprint(trusted)}"

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


class CrossFitScorer:
    """Frozen towers' pooled features; each pair scored by a ridge map fitted on the other folds' pairs.

    Folds are drawn by image (seeded), so a map never saw the image it scores, nor that image's other captions.
    `prepare` embeds every chunk once (saved beside the chunk scores, so a killed run resumes) and sums each
    fold's statistics; the maps come from those sums, so the table never has to fit in memory.
    """

    def __init__(self, model: Any, folds: int = 5, alpha: float = 300.0, batch_size: int = 64, seed: int = 0,
                 name: str = "crossfit") -> None:
        if folds < 2:
            raise ConfigError(f"the crossfit scorer needs folds >= 2 (a map must leave some images out); got {folds}.")
        self.model, self.folds, self.alpha, self.batch_size, self.seed = model.eval(), folds, alpha, batch_size, seed
        towers = "+".join(str(getattr(getattr(model, side, None), "source", "?")) for side in ("vision", "text"))
        self.key = f"{name}:{towers}:folds={folds}:alpha={alpha:g}:seed={seed}"
        self.folder: Path | None = None

    def _features(self, chunk: datasets.Dataset, file: Path) -> dict[str, torch.Tensor]:
        """A chunk's distinct images' features, each row's image slot (-1: unreadable) and caption features."""
        if file.exists():
            return load_file(file)
        images, row_image = embed_chunk_images(self.model, chunk, features=True, batch_size=self.batch_size)
        features = {"images": images.float().contiguous(), "row_image": row_image,
                    "texts": embed_texts(self.model, [t or "" for t in chunk["text"]], features=True,
                                         batch_size=self.batch_size).float().contiguous()}
        with atomic_path(file) as tmp:
            save_file(features, str(tmp))
        return features

    def prepare(self, data: datasets.Dataset, chunks: Sequence[np.ndarray], folder: Path, progress: bool) -> None:
        """Embed every chunk (or read its saved features) and fit one ridge map per fold."""
        from .baselines import RidgeMap, RidgeMoments

        ids = image_ids(data)
        if ids.max(initial=-1) + 1 < self.folds:
            raise DataError(f"the crossfit scorer splits images into {self.folds} folds but the data has "
                            f"{ids.max(initial=-1) + 1} images; use folds <= the number of images, or a trusted "
                            "set (scorer 'frozen').")
        self.fold = np.random.default_rng(self.seed).permutation(ids.max() + 1)[ids] % self.folds
        self.folder = folder / "features"
        self.folder.mkdir(parents=True, exist_ok=True)
        moments: list[Any] = [None] * self.folds
        for index, rows in enumerate(tqdm(chunks, desc="embedding pairs", unit="chunk", disable=not progress)):
            f = self._features(data.select(rows), self.folder / f"chunk-{index:05d}.safetensors")
            ok = f["row_image"] >= 0
            fold = torch.from_numpy(self.fold[rows])
            y = F.normalize(f["texts"], dim=-1)
            for k in range(self.folds):
                sel = ok & (fold == k)
                if moments[k] is None:
                    moments[k] = RidgeMoments.zeros(f["images"].shape[1] if len(f["images"]) else 0, y.shape[1])
                if bool(sel.any()):
                    slots = f["row_image"][sel]
                    counts = torch.bincount(slots, minlength=len(f["images"]))
                    sums = torch.zeros(len(f["images"]), y.shape[1], dtype=torch.float64).index_add_(
                        0, slots, y[sel].double())
                    used = counts > 0
                    moments[k].add(f["images"][used], sums[used], counts[used])
        total = moments[0]
        for m in moments[1:]:
            total = total + m
        self.maps = [RidgeMap.from_moments(total - m, self.alpha) for m in moments]

    def score(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Scores of chunk `index` (rows `rows` of the table), each by its fold's held-out map."""
        if self.folder is None:
            raise RuntimeError("CrossFitScorer.prepare must run before score")
        f = load_file(self.folder / f"chunk-{index:05d}.safetensors")
        scores = torch.full((len(rows),), float("nan"), dtype=torch.float64)
        fold = torch.from_numpy(self.fold[rows])
        for k, ridge in enumerate(self.maps):
            sel = (f["row_image"] >= 0) & (fold == k)
            if bool(sel.any()):
                x = ridge.embed_images(f["images"][f["row_image"][sel]])
                scores[sel] = (x * ridge.embed_texts(f["texts"][sel])).sum(-1).double()
        return scores.numpy()


def make_scorer(scorer: Any, trusted: Any = None, source: str | None = None, batch_size: int = 64,
                langs: Sequence[str] | None = None) -> Any:
    """A scorer from 'crossfit', 'frozen', 'model:DIR', a lilt model, a scorer object or a callable (SCORERS_HELP)."""
    import lilt

    if isinstance(scorer, (ModelScorer, CallableScorer, CrossFitScorer)):
        return scorer
    if isinstance(scorer, lilt.DualEncoder):
        return ModelScorer(scorer, batch_size=batch_size)
    if scorer == "crossfit":
        return CrossFitScorer(lilt.DualEncoder.from_backbones(), batch_size=batch_size)
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
