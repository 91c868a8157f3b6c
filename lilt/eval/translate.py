"""Parallel text as a closed-form translation of captions into the pivot language's part of the space.

A caption in a low-resource language embeds far from the pivot's (English) caption of the same concept:
multilingual-e5-small finds the English name of a test emoji from its Swahili name only 28% of the time.
Image-text pairs then teach the model where English captions of a concept lie, and the other language's
captions are not there. A linear map fitted on parallel text - each target sentence's embedding regressed
onto its pivot sentence's, ridge in closed form, one map per language (Mikolov et al. 2013's translation
matrix, in the space the scores use) - moves a language's captions to where the pivot's captions of the
same concept are. Measured on builtin:emoji-cldr (ridge map on frozen towers, 150 Swahili image pairs,
the names of the training emoji as parallel text, test = emoji no step saw): Swahili R@1 5.8 / 4.5 ->
14.5 / 10.8, Yoruba 3.4 / 2.1 -> 10.1 / 9.3; `benchmarks/claims.py`'s `*+translate` rows.

The map's ridge strength and how far captions move (`strength`: 0 leaves them, 1 replaces them by their
translation) are chosen per language on validation pairs, and strength 0 is always a candidate. Fit it
on the same embedding the scores use: a tuned model's (`encode_text`), or a ridge map's text side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..baselines import RidgeMap
from ..errors import ConfigError, DataError
from .retrieval import EmbeddedPairs, caption_subset, embed_texts, retrieval_by_lang

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1000.0)
DEFAULT_STRENGTHS = (0.0, 0.5, 0.75, 1.0)


@dataclass
class TranslationMaps:
    """Per language, a ridge map of caption embeddings onto their pivot translations' and how far to apply it."""

    maps: dict[str, RidgeMap]
    strength: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for lang in self.maps:
            self.strength.setdefault(lang, 1.0)
        for lang, s in self.strength.items():
            if not 0.0 <= s <= 1.0:
                raise ConfigError(f"translation strength {s} for {lang!r} must be in [0, 1] (0: captions left as "
                                  "they are, 1: replaced by their translation).")

    def translate(self, texts: torch.Tensor, lang: str) -> torch.Tensor:
        """Unit caption embeddings of one language moved toward their pivot translation (unchanged without a map)."""
        s = self.strength.get(lang, 0.0)
        if lang not in self.maps or s == 0.0:
            return texts
        own = F.normalize(texts.float(), dim=-1)
        return F.normalize(s * F.normalize(self.maps[lang](own), dim=-1) + (1.0 - s) * own, dim=-1)

    def apply(self, pairs: EmbeddedPairs) -> EmbeddedPairs:
        """The same pairs with each mapped language's captions translated (images untouched)."""
        if pairs.langs is None or not self.maps:
            return pairs
        texts = pairs.texts.clone()
        langs = np.asarray(pairs.langs)
        for lang in self.maps:
            rows = torch.from_numpy(np.flatnonzero(langs == lang))
            if len(rows):
                texts[rows] = self.translate(pairs.texts[rows], lang).to(texts.dtype)
        return EmbeddedPairs(pairs.images, texts, pairs.text_image, pairs.langs, pairs.skipped)


def fit_translation(source: torch.Tensor, target: torch.Tensor, langs: Sequence[str], alpha: float = 100.0
                    ) -> TranslationMaps:
    """One ridge map per language, target-sentence embedding -> its pivot (source) sentence's, at full strength."""
    if len(source) != len(target) or len(target) != len(langs):
        raise DataError(f"parallel embeddings disagree: {len(source)} sources, {len(target)} targets, {len(langs)} "
                        "languages; embed the table's source and target columns, one row each.")
    where = np.asarray(langs)
    maps = {}
    for lang in sorted(set(langs)):
        rows = torch.from_numpy(np.flatnonzero(where == lang))
        if len(rows) < 2:
            raise DataError(f"parallel text has {len(rows)} pair(s) in {lang!r}; a translation map needs at least 2 "
                            "(give more pairs, or leave the language out of the parallel languages).")
        maps[lang] = RidgeMap.fit(F.normalize(target[rows].float(), dim=-1), F.normalize(source[rows].float(), dim=-1),
                                  alpha)
    return TranslationMaps(maps)


def choose_translation(source: torch.Tensor, target: torch.Tensor, langs: Sequence[str], val: EmbeddedPairs,
                       alphas: Sequence[float] = DEFAULT_ALPHAS, strengths: Sequence[float] = DEFAULT_STRENGTHS
                       ) -> tuple[TranslationMaps, dict[str, dict[str, float]]]:
    """Per language, the ridge strength and translation strength with the best mean recall of that language
    on `val` (pairs embedded like `source`/`target`); returns the maps and each language's tried scores."""
    if val.langs is None:
        raise DataError("choosing translation maps needs validation pairs with a language column.")
    fits = {a: fit_translation(source, target, langs, a) for a in alphas}
    val_langs = np.asarray(val.langs)
    maps, strength, tried = {}, {}, {}
    for lang in sorted(set(langs)):
        rows = np.flatnonzero(val_langs == lang)
        if not len(rows):
            raise DataError(f"no validation captions in {lang!r} to choose its translation map on; add that "
                            "language to the validation data or leave it out of the parallel languages.")
        own = caption_subset(val, torch.from_numpy(rows))
        scores: dict[str, float] = {}
        best = (retrieval_by_lang(own)["all"]["mean_recall"], 0.0, alphas[0])
        scores["off"] = best[0]
        for a, fit in fits.items():
            for s in strengths:
                if s == 0.0:
                    continue
                one = TranslationMaps({lang: fit.maps[lang]}, {lang: s})
                score = retrieval_by_lang(one.apply(own))["all"]["mean_recall"]
                scores[f"alpha {a:g} strength {s:g}"] = score
                if score > best[0]:
                    best = (score, s, a)
        maps[lang], strength[lang], tried[lang] = fits[best[2]].maps[lang], best[1], scores
    return TranslationMaps(maps, strength), tried


@torch.inference_mode()
def embed_parallel(model: Any, table: Any, *, features: bool = False, batch_size: int = 256,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(source embeddings, target embeddings, languages) of a parallel table (lilt.data.parallel.load_parallel).

    `features`: the text tower's pooled features instead of the model's embeddings; `transform` then maps
    them into the space the scores use (e.g. a ridge map's `embed_texts`).
    """
    was = model.training
    model.eval()
    try:
        source = embed_texts(model, list(table["source"]), features=features, batch_size=batch_size)
        target = embed_texts(model, list(table["target"]), features=features, batch_size=batch_size)
    finally:
        model.train(was)
    if transform is not None:
        source, target = transform(source), transform(target)
    return source, target, list(table["lang"])
