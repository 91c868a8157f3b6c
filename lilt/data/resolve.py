"""From what `lilt.train` is given (a spec, a DataConfig or a table) to training and validation tables.

Validation comes from, in order: `val_source` (its `val_split`); a built-in's `val_split`; `val_fraction` of
the training images, held out by a seeded draw; the source's own `val_split` when it has one. Otherwise the
run has no validation, and says so in the log.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import datasets
import numpy as np

from ..config import DataConfig
from ..errors import ConfigError
from .identity import image_ids
from .selection import select_pairs
from .sources import MissingSplit, load_pairs

logger = logging.getLogger(__name__)


def source_options(data_config: DataConfig, seed: int) -> dict[str, Any]:
    """load_pairs keyword arguments a DataConfig implies (columns, languages, seed, source options)."""
    return dict(image_column=data_config.image_column, text_column=data_config.text_column,
                lang_column=data_config.lang_column, langs=data_config.langs, seed=seed,
                allow_outside_root=data_config.allow_outside_root, **data_config.options)


def resolve_data(data: Any, data_config: DataConfig | None, seed: int) -> tuple[Any, Any, DataConfig]:
    """Training and validation tables from a spec string, a DataConfig or a ready `datasets` table.

    `data.curate` then keeps the best-scored share of the training pairs. It runs after the caps
    (pairs_per_lang, max_pairs) and the validation hold-out: the caps say what data a run has, as a
    scarce-data simulation, and curation filters what one has - a cap applied after it would refill the
    budget from pairs curation rejected. Validation is never curated, so runs with and without it compare.
    """
    train_data, val, data_config = _resolve(data, data_config, seed)
    if data_config.curate is not None:
        from ..curation import curate_table  # imports torch and the towers: only when asked for

        source = data_config.source if not isinstance(data, datasets.Dataset) else None
        # The built-in's own validation split is clean (noise touches training only); a hold-out from the
        # training split is not, so then the scorer reads the built-in's validation split itself.
        own_split = source and source.startswith("builtin:") and not data_config.val_fraction \
            and not data_config.val_source
        trusted = val if own_split else None
        train_data = curate_table(train_data, data_config.curate, source, trusted, data_config.langs)
    return train_data, val, data_config


def _resolve(data: Any, data_config: DataConfig | None, seed: int) -> tuple[Any, Any, DataConfig]:
    if isinstance(data, DataConfig):
        data_config, data = data, None
    elif isinstance(data, (str, os.PathLike)):
        data_config = DataConfig.from_dict({**(data_config.to_dict() if data_config else {}), "source": str(data)})
        data = None
    data_config = data_config or DataConfig()
    options = source_options(data_config, seed)
    source, val_source = data_config.source, data_config.val_source
    caps = dict(pairs_per_lang=data_config.pairs_per_lang, max_pairs=data_config.max_pairs)
    if data_config.val_fraction and not val_source:
        if data is None:  # hold the images out before the caps, so a cap never takes from validation
            data = load_pairs(source, data_config.split, **options)
        data, val = split_by_image(data, data_config.val_fraction, seed)
        return select_pairs(data, **caps, seed=seed), val, data_config
    if data is None:
        data = load_pairs(source, data_config.split, **caps, streaming=data_config.streaming, **options)
    if source.startswith("builtin:") and not val_source:
        return data, load_pairs(source, data_config.val_split, **options), data_config
    if val_source and val_source != source:
        try:
            return data, load_pairs(val_source, data_config.val_split, **options), data_config
        except MissingSplit:  # a folder or table of its own, with one split: all of it is validation
            logger.info("validating on all of %r (it has no %r split)", val_source, data_config.val_split)
            return data, load_pairs(val_source, "train", **options), data_config
    try:
        val = load_pairs(source, data_config.val_split, **options)
    except MissingSplit:
        logger.warning("no validation: %r has no %r split; set data.val_fraction (e.g. 0.1) to hold out part of "
                       "the training images, or data.val_source.", source, data_config.val_split)
        val = None
    return data, val, data_config


def split_by_image(data: Any, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training, validation) rows: a seeded `fraction` of the distinct images, with all their captions, held out."""
    if not isinstance(data, datasets.Dataset):
        raise ConfigError("data.val_fraction needs a map-style table (a stream cannot be split by image); give "
                          "data.val_source instead, or set data.streaming: false.")
    ids = image_ids(data)
    count = int(ids.max()) + 1 if len(ids) else 0
    held = max(1, round(fraction * count))
    if held >= count:
        raise ConfigError(f"data.val_fraction={fraction} holds out {held} of the {count} images, leaving none to "
                          "train on; lower it.")
    chosen = np.zeros(count, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(count)[:held]] = True
    in_val = chosen[ids]
    return data.select(np.flatnonzero(~in_val)), data.select(np.flatnonzero(in_val))
