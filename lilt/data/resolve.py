"""From what `lilt.train` is given (a spec, a DataConfig or a table) to training and validation tables."""

from __future__ import annotations

import os
from typing import Any

from ..config import DataConfig
from .sources import load_pairs


def source_options(data_config: DataConfig, seed: int) -> dict[str, Any]:
    """load_pairs keyword arguments a DataConfig implies (columns, languages, seed, source options)."""
    return dict(image_column=data_config.image_column, text_column=data_config.text_column,
                lang_column=data_config.lang_column, langs=data_config.langs, seed=seed,
                allow_outside_root=data_config.allow_outside_root, **data_config.options)


def resolve_data(data: Any, data_config: DataConfig | None, seed: int) -> tuple[Any, Any, DataConfig]:
    """Training and validation tables from a spec string, a DataConfig or a ready `datasets` table."""
    if isinstance(data, DataConfig):
        data_config, data = data, None
    elif isinstance(data, (str, os.PathLike)):
        data_config = DataConfig.from_dict({**(data_config.to_dict() if data_config else {}), "source": str(data)})
        data = None
    data_config = data_config or DataConfig()
    options = source_options(data_config, seed)
    if data is None:
        data = load_pairs(data_config.source, data_config.split, pairs_per_lang=data_config.pairs_per_lang,
                          max_pairs=data_config.max_pairs, streaming=data_config.streaming, **options)
    val = None
    if data_config.val_source or data_config.source.startswith("builtin:"):
        val = load_pairs(data_config.val_source or data_config.source, data_config.val_split, **options)
    return data, val, data_config
