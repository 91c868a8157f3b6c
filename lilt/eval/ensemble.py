"""Output-space ensemble: a tuned model's cosine scores mixed with the ridge map's on its frozen towers' features.

Tuning memorizes the training concepts; the closed-form ridge map on the frozen towers keeps what the
backbones knew. On concepts no training step saw, `(1 - w) cos(tuned) + w cos(ridge)` with `w` chosen on
validation retrieves better on average than either alone (measured on builtin:emoji-cldr: benchmarks/claims.py's
`lwa+ridge-ensemble`). It is WiSE-FT's idea - stay close to what the backbones know - in the space of
scores rather than of weights (Wortsman et al. 2022 compare the two), and the ridge side costs one
closed-form fit. The mix rides in concatenated embeddings, `[sqrt(1-w) tuned, sqrt(w) ridge]`, so every
recall routine (and the hubness correction) works on it unchanged. With parallel text, each side's captions
are first moved by its own translation maps (lilt.eval.translate), chosen on validation before the weight.
With the hubness correction (lilt.eval.hubness), the weight and the correction's k and beta are chosen together
on validation (`choose_weight_and_hubness`): a weight chosen first, on uncorrected scores, is not the best one
once the correction acts on the mix (measured on builtin:emoji-cldr, seed 2 of the demo recipe: validation 49.0
with the weight first, against the training-free row's 49.1).
The ridge side may read multi-scale image features (`stages`) and be kernel ridge regression (`kernel='rbf'`,
lilt.baselines.KernelRidgeMap, or 'rbf-two-way'); the demo recipe uses both. With `towers='tuned'` the map
is fitted on the tuned model's own towers' features instead of the frozen ones, after training: tuning then
serves the map as well as the mixed scores (measured on builtin:emoji-cldr: benchmarks/claims.py's
`lwa+translate+kridge-2way-tuned-ensemble+hubness` against its frozen-towers twin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import datasets
import torch
import torch.nn.functional as F

from ..baselines import TextSpaceMap, fit_ridge, pair_features, ridge_pairs
from ..errors import ConfigError, DataError
from .hubness import HubnessBank, choose_hubness
from .retrieval import EmbeddedPairs, embed_pairs, retrieval_by_lang
from .translate import TranslationMaps, choose_translation, embed_parallel

# 1.0 (the ridge map alone) included: with the map on multi-scale features it can be the better side.
DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOWERS = ("frozen", "tuned")  # which towers' features the ridge map reads


def mix_pairs(tuned: EmbeddedPairs, mapped: EmbeddedPairs, weight: float) -> EmbeddedPairs:
    """Pairs whose dot products are (1 - weight) * the tuned cosine + weight * the mapped cosine.

    Both must hold the same captions in the same order; images are matched through the captions, so the
    two may list the distinct images in different orders.
    """
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"ensemble weight={weight} must be in [0, 1] (0: the tuned model alone, 1: the ridge map).")
    if len(tuned.texts) != len(mapped.texts) or len(tuned.images) != len(mapped.images):
        raise DataError(f"the two sides embed different data ({len(tuned.images)} / {len(mapped.images)} images, "
                        f"{len(tuned.texts)} / {len(mapped.texts)} captions); embed the same table with both.")
    if weight == 0:  # the tuned side alone, at its own width (a hubness bank chosen at w 0 matches it)
        return EmbeddedPairs(F.normalize(tuned.images.float(), dim=-1), F.normalize(tuned.texts.float(), dim=-1),
                             tuned.text_image, tuned.langs, tuned.skipped)
    where = torch.empty(len(tuned.images), dtype=torch.long)
    where[tuned.text_image] = mapped.text_image
    a, b = (1.0 - weight) ** 0.5, weight ** 0.5
    images = torch.cat([a * F.normalize(tuned.images.float(), dim=-1),
                        b * F.normalize(mapped.images[where].float(), dim=-1)], 1)
    texts = torch.cat([a * F.normalize(tuned.texts.float(), dim=-1), b * F.normalize(mapped.texts.float(), dim=-1)],
                      1)
    return EmbeddedPairs(images, texts, tuned.text_image, tuned.langs, tuned.skipped)


def choose_weight(tuned: EmbeddedPairs, mapped: EmbeddedPairs, weights: Sequence[float] = DEFAULT_WEIGHTS
                  ) -> tuple[float, dict[float, dict[str, float]]]:
    """The weight with the best pooled mean recall on these (validation) pairs, and each weight's pooled scores."""
    tried = {float(w): retrieval_by_lang(mix_pairs(tuned, mapped, float(w)))["all"] for w in weights}
    return max(tried, key=lambda w: tried[w]["mean_recall"]), tried


def choose_weight_and_hubness(tuned_train: EmbeddedPairs, tuned_val: EmbeddedPairs, mapped_train: EmbeddedPairs,
                              mapped_val: EmbeddedPairs, weights: Sequence[float] = DEFAULT_WEIGHTS,
                              **grid: Any) -> tuple[float, HubnessBank, dict[str, float]]:
    """The weight and the CSLS bank (k, beta) with the best corrected validation mean recall, chosen together.

    The bank is built from the mixed training pairs at each weight; `grid`: choose_hubness' ks and betas.
    Returns the weight, the bank and each (weight, k, beta)'s validation mean recall.
    """
    best: tuple[float, float, HubnessBank] | None = None
    tried: dict[str, float] = {}
    for w in weights:
        bank, scores = choose_hubness(mix_pairs(tuned_train, mapped_train, float(w)),
                                      mix_pairs(tuned_val, mapped_val, float(w)), **grid)
        tried.update({f"w={float(w):g} {key}": value for key, value in scores.items()})
        top = max(scores.values())
        if best is None or top > best[0]:  # ties keep the smaller weight, as choose_weight does
            best = (top, float(w), bank)
    if best is None:
        raise ConfigError("choose_weight_and_hubness needs at least one ensemble weight.")
    return best[1], best[2], tried


@dataclass
class RidgeEnsemble:
    """A tuned DualEncoder, the towers its ridge map reads, and that map: one retriever."""

    model: Any
    frozen: Any  # the towers the ridge map reads: the untuned ones, or `model` itself (towers='tuned')
    ridge: TextSpaceMap  # RidgeMap or KernelRidgeMap
    weight: float
    translation: TranslationMaps | None = None  # the tuned side's caption maps (lilt.eval.translate)
    ridge_translation: TranslationMaps | None = None  # the ridge side's, fitted in its text space
    stages: bool = False  # the ridge map reads multi-scale image features (pair_features(stages=True))
    hubness: HubnessBank | None = None  # the CSLS bank of the mixed training pairs, chosen with the weight

    def embed_pairs(self, data: datasets.Dataset, **options: Any) -> EmbeddedPairs:
        """The mixed embeddings of a pair table (`options`: embed_pairs' batch_size, num_workers, progress)."""
        tuned = embed_pairs(self.model, data, **options)
        if self.translation is not None:
            tuned = self.translation.apply(tuned)
        if self.weight == 0:
            return tuned
        mapped = ridge_pairs(self.ridge, pair_features(self.frozen, data, stages=self.stages, **options))
        if self.ridge_translation is not None:
            mapped = self.ridge_translation.apply(mapped)
        return mix_pairs(tuned, mapped, self.weight)

    def evaluate(self, data: datasets.Dataset, k: Sequence[int] = (1, 5, 10), **options: Any) -> dict[str, Any]:
        """Retrieval recall@K per language and pooled (CSLS-corrected when the ensemble has a hubness bank)."""
        pairs = self.embed_pairs(data, **options)
        return retrieval_by_lang(self.hubness.correct(pairs) if self.hubness is not None else pairs, k)


def fit_ridge_ensemble(model: Any, train_data: datasets.Dataset, val_data: datasets.Dataset, *, frozen: Any = None,
                       weights: Sequence[float] = DEFAULT_WEIGHTS, parallel: datasets.Dataset | None = None,
                       stages: bool = False, kernel: str = "linear", hubness: bool = False, towers: str = "frozen",
                       **options: Any) -> tuple[RidgeEnsemble, dict[Any, float]]:
    """Fit the ridge map on the frozen towers' features of `train_data`; choose the weight on `val_data`.

    `frozen`: a DualEncoder of the untuned towers (default: built afresh from `model.config`, i.e. the
    pretrained backbones). `towers`: 'tuned' fits the map on `model`'s own towers' features instead (no
    frozen copy is built). `parallel`: a parallel table (lilt.data.parallel.load_parallel) for translation
    maps on both sides, chosen on `val_data` before the weight. `stages`: the ridge map reads the images'
    multi-scale features (lilt.baselines.pair_features). `kernel`: the ridge map's, 'linear' or 'rbf'
    (lilt.baselines.fit_ridge). `hubness`: choose the weight together with a CSLS bank of the mixed training
    pairs (choose_weight_and_hubness; the bank is the ensemble's `hubness`). Returns the ensemble and each
    weight's (with `hubness`, each "w=.. k=.. beta=.." point's) validation mean recall.
    """
    if towers not in TOWERS or (towers == "tuned" and frozen is not None):
        raise ConfigError(f"towers={towers!r} (frozen given: {frozen is not None}): choose one of {list(TOWERS)}; "
                          "'tuned' reads the model's own towers, so pass no frozen model with it.")
    if towers == "tuned":
        frozen = model
    elif frozen is None:
        from ..model import DualEncoder
        frozen = DualEncoder(model.config).to(model.device).eval()
    train_features, val_features = (pair_features(frozen, d, stages=stages, **options) for d in (train_data, val_data))
    ridge = fit_ridge(train_features, val=val_features, kernel=kernel)
    tuned_val, ridge_val = embed_pairs(model, val_data, **options), ridge_pairs(ridge, val_features)
    translation = ridge_translation = None
    if parallel is not None:
        size = options.get("batch_size", 256)
        translation, _ = choose_translation(*embed_parallel(model, parallel, batch_size=size), tuned_val)
        ridge_translation, _ = choose_translation(*embed_parallel(frozen, parallel, features=True, batch_size=size,
                                                                  transform=ridge.embed_texts), ridge_val)
        tuned_val, ridge_val = translation.apply(tuned_val), ridge_translation.apply(ridge_val)
    if hubness:
        tuned_train, ridge_train = embed_pairs(model, train_data, **options), ridge_pairs(ridge, train_features)
        if translation is not None and ridge_translation is not None:
            tuned_train, ridge_train = translation.apply(tuned_train), ridge_translation.apply(ridge_train)
        weight, bank, scores = choose_weight_and_hubness(tuned_train, tuned_val, ridge_train, ridge_val, weights)
        return (RidgeEnsemble(model, frozen, ridge, weight, translation, ridge_translation, stages, bank), scores)
    best, tried = choose_weight(tuned_val, ridge_val, weights)
    return (RidgeEnsemble(model, frozen, ridge, best, translation, ridge_translation, stages),
            {w: v["mean_recall"] for w, v in tried.items()})
