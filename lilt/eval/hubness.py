"""Hubness correction for retrieval of concepts no training step saw: CSLS against a bank of training embeddings.

In a shared embedding space a few gallery items ("hubs") sit close to many queries and come first for
all of them; on unseen concepts they crowd out the right answer. CSLS (Conneau et al. 2018, the query
bank of QB-Norm, Bogolin et al. 2022) lowers each gallery item's cosine score by `beta` times its mean
similarity to its `k` nearest neighbours in a bank of *training* queries:

- a caption in an image->text gallery is measured against the training images;
- an image in a text->image gallery is measured against the training captions **in the query's
  language**. An English bank mis-measures hubs for Swahili queries (measured on builtin:emoji-cldr's
  validation split, ridge map: Yoruba t2i R@1 3.1 -> 1.5 with the English bank, -> 6.9 with Yoruba's own).
  A language with fewer than `k` training captions gets no text->image correction.

Nothing about the evaluated set is used, so a corrected index scores the same at serving time as here.
The correction rides in two extra coordinates per side (`HubnessBank.correct`): a dot product of the
returned embeddings is the corrected score, so every recall routine works on them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .retrieval import EmbeddedPairs, retrieval_by_lang

ANY_LANG = "*"  # the bank key of captions with no language column


def _langs(pairs: EmbeddedPairs) -> list[str]:
    return list(pairs.langs) if pairs.langs is not None else [ANY_LANG] * len(pairs.texts)


def mean_top_k(x: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Each row of `x`'s mean cosine similarity to its `k` most similar rows of `bank` (a chunk of rows at a time)."""
    bank = F.normalize(bank.float(), dim=-1)
    return torch.cat([(F.normalize(x[s:s + chunk].float(), dim=-1) @ bank.t()).topk(k, dim=-1).values.mean(-1)
                      for s in range(0, len(x), chunk)]) if len(x) else x.new_zeros(0)


@dataclass
class HubnessBank:
    """Training embeddings (images; captions per language) that measure how much of a hub a gallery item is."""

    images: torch.Tensor
    texts: dict[str, torch.Tensor]
    k: int = 10
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.k < 1 or self.k > len(self.images):
            raise ConfigError(f"hubness k={self.k} must be between 1 and the bank's {len(self.images)} images; "
                              "pass a smaller k or a larger training set.")
        if self.beta < 0:
            raise ConfigError(f"hubness beta={self.beta} must be >= 0 (0 turns the correction off).")

    @classmethod
    def from_pairs(cls, train: EmbeddedPairs, k: int = 10, beta: float = 0.5) -> "HubnessBank":
        """A bank of the training split's embeddings (as returned by embed_pairs, or a ridge map's)."""
        langs = _langs(train)
        texts = {lang: train.texts[[i for i, x in enumerate(langs) if x == lang]] for lang in sorted(set(langs))}
        return cls(train.images, texts, k, beta)

    def with_strength(self, k: int, beta: float) -> "HubnessBank":
        """The same bank at another k and beta."""
        return HubnessBank(self.images, self.texts, k, beta)

    def correct(self, pairs: EmbeddedPairs) -> EmbeddedPairs:
        """Pairs whose dot products are the corrected scores: cos - beta * hubness of the gallery item."""
        images, texts = F.normalize(pairs.images.float(), dim=-1), F.normalize(pairs.texts.float(), dim=-1)
        if self.beta == 0:
            return EmbeddedPairs(images, texts, pairs.text_image, pairs.langs, pairs.skipped)
        langs = _langs(pairs)
        banked = [lang for lang in sorted(set(langs)) if len(self.texts.get(lang, ())) >= self.k]
        column = {lang: i for i, lang in enumerate(banked)}
        # image side: [x, 1, -beta * hubness among each language's captions]; caption side: [t, -beta * h, one-hot]
        image_hub = torch.stack([mean_top_k(images, self.texts[lang], self.k) for lang in banked], 1) \
            if banked else images.new_zeros(len(images), 0)
        caption_hub = mean_top_k(texts, self.images, self.k)
        which = torch.zeros(len(texts), len(banked))
        rows = [(i, column[x]) for i, x in enumerate(langs) if x in column]
        if rows:
            which[torch.tensor([r for r, _ in rows]), torch.tensor([c for _, c in rows])] = 1.0
        images = torch.cat([images, images.new_ones(len(images), 1), -self.beta * image_hub], 1)
        texts = torch.cat([texts, -self.beta * caption_hub[:, None], which], 1)
        return EmbeddedPairs(images, texts, pairs.text_image, pairs.langs, pairs.skipped)


def choose_hubness(train: EmbeddedPairs, val: EmbeddedPairs, ks: Sequence[int] = (5, 10, 20, 50),
                   betas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                   score: Callable[[EmbeddedPairs], float] | None = None) -> tuple[HubnessBank, dict[str, float]]:
    """The bank of `train` at the k and beta with the best validation mean recall (beta 0: no correction).

    The default grid reaches past what builtin:emoji-cldr's validation chose (k 10 on every seed with k in
    10 / 50 and beta up to 0.75: the edge), so a choice at its edge is rarer.
    """
    score = score or (lambda pairs: retrieval_by_lang(pairs)["all"]["mean_recall"])
    bank = HubnessBank.from_pairs(train, k=1, beta=0.0)
    tried = {}
    for k in ks:
        if k > len(train.images):
            continue
        for beta in betas:
            tried[f"k={k} beta={beta:g}"] = score(bank.with_strength(k, beta).correct(val))
    if not tried:
        raise ConfigError(f"hubness ks={list(ks)} are all larger than the {len(train.images)} training images.")
    best = max(tried, key=tried.__getitem__)
    k, beta = (float(part.split("=")[1]) for part in best.split())
    return bank.with_strength(int(k), beta), tried
