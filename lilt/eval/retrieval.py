"""Image-text retrieval: embed each distinct image and each caption once, then recall@K in chunks.

An image may have several captions (several languages, or several annotators as in COCO): image->text
counts a hit when any of its captions ranks in the top K; text->image when the caption's own image
does. Wrong candidates that tie with the positive (within `TIE_TOL`) share the places they span with
it, as if ties were broken at random: collapsed embeddings score chance, neither 0 nor 100. Scores are
computed a block of queries at a time, so the full similarity matrix is never held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..cpu_memory import keeps_freed_memory
from ..errors import ConfigError, DataError
from ..finite import check_finite
from ..data.identity import image_keys
from ..data.loader import pair_loader
from ..data.transforms import PairCollator

Features = Union[bool, Literal["stages"]]  # what embed_* return: embeddings, pooled features, multi-scale features


@dataclass
class EmbeddedPairs:
    """Embeddings of distinct images and of all captions, with each caption's image and language."""

    images: torch.Tensor
    texts: torch.Tensor
    text_image: torch.Tensor
    langs: list[str] | None
    skipped: list[str]


@keeps_freed_memory
@torch.inference_mode()
def embed_images(model: Any, data: datasets.Dataset, *, features: Features = False, batch_size: int = 256,
                 num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embed every row's image: (embeddings of the readable ones, their row numbers, what could not be read)."""
    if features not in (True, False, "stages"):
        raise ConfigError(f"features={features!r} must be False (embeddings), True (pooled tower features) or "
                          "'stages' (pooled features and every vision block's pooled output).")
    collate = PairCollator(model.image_transform(train=False), tokenize=None, extra_columns=())
    loader = pair_loader(data, collate, batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    encode = model.image_stage_features if features == "stages" else \
        model.image_features if features else model.encode_image
    images, kept, skipped = [], [], []
    for batch in tqdm(loader, disable=not progress, desc="images", leave=False):
        skipped += batch["bad"]
        if "pixel_values" in batch:
            images.append(encode(batch["pixel_values"].to(model.device)).float().cpu())
            kept.append(batch["rows"])
    if not images:
        raise DataError(f"none of the {len(data)} images could be read (e.g. {'; '.join(skipped[:3])}).")
    return check_finite(torch.cat(images), "image embeddings"), torch.cat(kept), skipped


@keeps_freed_memory
@torch.inference_mode()
def embed_texts(model: Any, texts: Sequence[str], *, features: Features = False, batch_size: int = 256,
                progress: bool = False) -> torch.Tensor:
    """Embed captions in batches of similar length (tokenized a batch at a time), returned in the input order."""
    encode = model.text_features if features else model.encode_text
    # Longest first, as sentence-transformers does: a batch pads to its longest caption, so mixing lengths
    # (138 languages' names) wastes most of the text tower's work on padding.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunks = [encode({k: v.to(model.device) for k, v in
                      model.tokenize([texts[i] for i in order[s:s + batch_size]]).items()}).float().cpu()
              for s in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="texts", leave=False)]
    if not chunks:
        raise DataError("no captions to embed.")
    out = chunks[0].new_empty((len(texts), chunks[0].shape[1]))
    out[torch.from_numpy(order)] = torch.cat(chunks)
    return check_finite(out, "caption embeddings")


@torch.inference_mode()
def embed_distinct_images(model: Any, data: datasets.Dataset, *, features: Features = False, batch_size: int = 256,
                          num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each distinct image of a table embedded once: (embeddings of the readable ones, each row's slot among
    them (-1: unreadable), what could not be read)."""
    keys = image_keys(data)
    first: dict[Any, int] = {}
    unique_rows = [first.setdefault(k, row) for row, k in enumerate(keys) if k not in first]
    images, kept, skipped = embed_images(model, data.select(unique_rows), features=features, batch_size=batch_size,
                                         num_workers=num_workers, progress=progress)
    slot = torch.full((len(unique_rows),), -1, dtype=torch.long)
    slot[kept] = torch.arange(len(kept))
    position = {row: i for i, row in enumerate(unique_rows)}
    return images, slot[[position[first[k]] for k in keys]], skipped


def embed_pairs(model: Any, data: datasets.Dataset, *, features: Features = False, batch_size: int = 256,
                num_workers: int = 0, progress: bool = False) -> EmbeddedPairs:
    """Embed each distinct image and every caption; `features=True` gives the towers' pooled features instead
    ('stages': the images' pooled features and each vision block's pooled output, DualEncoder.image_stage_features).

    A table without a `text` column gives the images alone (and no captions).
    """
    if isinstance(data, datasets.IterableDataset):
        raise DataError("evaluation needs a map-style dataset (it groups captions by image): load the source "
                        "without streaming, or convert webdataset shards with datasets.Dataset.from_generator.")
    was_training = model.training
    model.eval()
    # Images that could not be read take their captions out of the evaluation (reported in `skipped`).
    images_t, text_image, skipped = embed_distinct_images(model, data, features=features, batch_size=batch_size,
                                                          num_workers=num_workers, progress=progress)
    if "text" not in data.column_names:  # images only (`lilt embed --what image` on a table without captions)
        model.train(was_training)
        return EmbeddedPairs(images_t, images_t[:0], text_image[:0], None, skipped)
    texts = data["text"]
    if not texts:
        raise DataError("no captions to evaluate (check the languages asked for: the data may have none of them).")
    texts_t = embed_texts(model, texts, features=features, batch_size=batch_size, progress=progress)
    model.train(was_training)
    langs = data["lang"] if "lang" in data.column_names else None
    valid = text_image >= 0
    if not bool(valid.all()):
        langs = [lang for lang, ok in zip(langs, valid.tolist()) if ok] if langs is not None else None
    return EmbeddedPairs(images_t, texts_t[valid], text_image[valid], langs, skipped)


# Scores this close count as tied: batching (padding, kernels) moves equal embeddings by float noise.
TIE_TOL = 1e-5


def hit_chance(higher: torch.Tensor, tied: torch.Tensor, k: int, own: torch.Tensor | int = 1) -> torch.Tensor:
    """Chance (0..1) that one of `own` tied positives is in the top k, behind `higher` and among `tied` wrong ones.

    With ties broken at random, the r = k - higher places left go to r of the tied + own candidates:
    a miss needs all r from the wrong ones, C(tied, r) / C(tied + own, r).
    """
    r = (k - higher).double()
    t, m = tied.double(), torch.as_tensor(own, dtype=torch.double)
    n = t + m
    places = r.clamp(0).minimum(n)
    log_miss = (torch.lgamma(t + 1) - torch.lgamma(places + 1) - torch.lgamma((t - places).clamp(min=0) + 1)
                - torch.lgamma(n + 1) + torch.lgamma(places + 1) + torch.lgamma(n - places + 1))
    miss = torch.where(places > t, torch.zeros_like(r), log_miss.exp())
    return torch.where(r <= 0, torch.zeros_like(r), 1 - miss).clamp(0, 1)


def recall_at_k(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor,
                k: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@K (in %) for L2-normalized embeddings; text_image[j] = image of text j.

    Non-finite embeddings are an error, never a score: NaN compares neither greater nor tied, which would
    make every positive look like the top hit.
    """
    check_finite(images, "image embeddings")
    check_finite(texts, "caption embeddings")
    if not len(texts) or not images.shape[0]:
        raise DataError(f"recall needs images and captions; got {images.shape[0]} images and {len(texts)} captions.")
    n_images = images.shape[0]
    # text -> image: how many images beat / tie the caption's own image.
    t2i = torch.empty(2, len(texts), dtype=torch.long)
    for s in range(0, len(texts), chunk):
        scores = texts[s:s + chunk] @ images.t()
        positive = scores.gather(1, text_image[s:s + chunk, None])
        t2i[0, s:s + chunk] = (scores > positive + TIE_TOL).sum(1)
        t2i[1, s:s + chunk] = ((scores - positive).abs() <= TIE_TOL).sum(1) - 1  # not the positive itself
    # image -> text: how many other images' captions beat / tie the image's best-scoring caption.
    i2t = torch.empty(3, n_images, dtype=torch.long)
    for s in range(0, n_images, chunk):
        scores = images[s:s + chunk] @ texts.t()
        own = text_image[None, :] == torch.arange(s, min(s + chunk, n_images))[:, None]
        best = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        tie = (scores - best).abs() <= TIE_TOL
        i2t[0, s:s + chunk] = ((scores > best + TIE_TOL) & ~own).sum(1)
        i2t[1, s:s + chunk] = (tie & ~own).sum(1)
        i2t[2, s:s + chunk] = (tie & own).sum(1)  # own captions tied with the best: any of them is a hit
    has_caption = torch.bincount(text_image, minlength=n_images) > 0
    i2t = i2t[:, has_caption]
    out = {}
    for kk in k:
        out[f"i2t/R@{kk}"] = 100.0 * float(hit_chance(i2t[0], i2t[1], kk, i2t[2]).mean())
        out[f"t2i/R@{kk}"] = 100.0 * float(hit_chance(t2i[0], t2i[1], kk).mean())
    out["mean_recall"] = float(np.mean([out[f"{d}/R@{kk}"] for d in ("i2t", "t2i") for kk in k]))
    return out


def retrieval_by_lang(embedded: EmbeddedPairs, k: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Recall per caption language (that language's captions vs the images they describe) and pooled ('all')."""
    out = {"all": recall_at_k(embedded.images, embedded.texts, embedded.text_image, k)}
    out["all"]["images"] = int(torch.unique(embedded.text_image).numel())
    out["all"]["texts"] = len(embedded.texts)
    if embedded.langs is None:
        return out
    langs = np.asarray(embedded.langs)
    for lang in sorted(set(embedded.langs)):
        own = caption_subset(embedded, torch.from_numpy(np.flatnonzero(langs == lang)))
        out[lang] = recall_at_k(own.images, own.texts, own.text_image, k)
        out[lang]["images"], out[lang]["texts"] = len(own.images), len(own.texts)
    return out


def caption_subset(embedded: EmbeddedPairs, rows: torch.Tensor) -> EmbeddedPairs:
    """The captions `rows` and only the images they describe (renumbered): e.g. one language's share."""
    images, text_image = torch.unique(embedded.text_image[rows], return_inverse=True)
    langs = np.asarray(embedded.langs)[rows.numpy()].tolist() if embedded.langs is not None else None
    return EmbeddedPairs(embedded.images[images], embedded.texts[rows], text_image, langs, [])


def evaluate_retrieval(model: Any, data: datasets.Dataset, k: Sequence[int] = (1, 5, 10), *, batch_size: int = 256,
                       num_workers: int = 0, progress: bool = False,
                       hubness: Any = None) -> dict[str, dict[str, float]]:
    """Retrieval recall@K in both directions, per language and pooled, for a DualEncoder on pair data.

    `hubness`: a lilt.eval.hubness.HubnessBank of the model's training embeddings, to score with the CSLS
    correction (typed Any: hubness builds on this module, and the other way round would be an import cycle).
    """
    embedded = embed_pairs(model, data, batch_size=batch_size, num_workers=num_workers, progress=progress)
    return retrieval_by_lang(hubness.correct(embedded) if hubness is not None else embedded, k)
