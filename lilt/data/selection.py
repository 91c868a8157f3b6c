"""Choosing rows of a pair table: languages, a seeded cap per language, a total cap."""

from __future__ import annotations

from typing import Mapping, Sequence

import datasets
import numpy as np

from ..errors import DataError


def select_pairs(data: datasets.Dataset | datasets.IterableDataset, *, langs: Sequence[str] | None = None,
                 pairs_per_lang: int | Mapping[str, int] | None = None, max_pairs: int | None = None,
                 seed: int = 0) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the given languages, at most `pairs_per_lang` rows of each (seeded), at most `max_pairs` rows."""
    if (langs or pairs_per_lang) and "lang" not in data.column_names:
        raise DataError(f"langs/pairs_per_lang need a language column; this source has {data.column_names}. "
                        "Name it with lang_column=...")
    if langs:
        wanted = set(langs)
        if isinstance(data, datasets.Dataset):  # a stream cannot be counted before it is read
            present = set(data.unique("lang"))
            absent = sorted(wanted - present)
            if absent:
                raise DataError(f"no captions in language {', '.join(absent)} (asked for by langs={list(langs)}); "
                                f"the data has {', '.join(sorted(map(str, present))) or 'no language values'}.")
        data = data.filter(lambda batch: [x in wanted for x in batch["lang"]], batched=True)
    if pairs_per_lang is not None:
        if isinstance(data, datasets.IterableDataset):
            raise DataError("pairs_per_lang needs a map-style dataset; it cannot cap a streamed source.")
        data = data.select(capped_rows(np.asarray(data["lang"]), pairs_per_lang, seed))
    if max_pairs is not None:
        data = data.take(max_pairs) if isinstance(data, datasets.IterableDataset) else \
            data.select(range(min(max_pairs, len(data))))
    return data


def capped_rows(langs: np.ndarray, caps: int | Mapping[str, int], seed: int) -> list[int]:
    """Row indices keeping at most caps[lang] rows per language, chosen by a seeded permutation."""
    present = {str(x) for x in np.unique(langs)}
    absent = sorted(set(caps) - present) if not isinstance(caps, int) else []
    if absent:  # a budget for a language the data does not have is a typo (or the wrong `langs`)
        raise DataError(f"pairs_per_lang names {absent}, but the data has no pairs in that language (it has "
                        f"{sorted(present)[:12]}{' ...' if len(present) > 12 else ''}).")
    order = np.random.default_rng(seed).permutation(len(langs))
    keep = np.ones(len(langs), dtype=bool)
    for lang in np.unique(langs):
        cap = caps if isinstance(caps, int) else caps.get(str(lang))
        if cap is None:
            continue
        rows = order[langs[order] == lang]
        keep[rows[cap:]] = False
    return np.flatnonzero(keep).tolist()
