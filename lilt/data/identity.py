"""Which rows of a pair table show the same image: one table row per caption must not make two images."""

from __future__ import annotations

import hashlib
from typing import Any

import datasets
import numpy as np
import pyarrow as pa


def image_keys(data: datasets.Dataset) -> list[Any]:
    """An identity per row's image: its file path, else a hash of its bytes, else the row itself."""
    # Through the row mapping (select/filter/shuffle), not the underlying Arrow table.
    column = data.select_columns(["image"]).with_format("arrow")[:]["image"].combine_chunks()
    if pa.types.is_struct(column.type):
        paths, blobs = column.field("path").to_pylist(), column.field("bytes").to_pylist()
        # Embedded files keep only their base name as `path`: two different 1.jpg must not merge.
        return [("bytes", hashlib.sha1(b).hexdigest()) if b else (p if p else ("row", i))
                for i, (p, b) in enumerate(zip(paths, blobs))]
    # Tables read by datasets give large_string paths; both string kinds are paths.
    is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    paths = column.to_pylist() if is_text else [None] * len(column)
    return [p if p else ("row", i) for i, p in enumerate(paths)]


def image_ids(data: datasets.Dataset) -> np.ndarray:
    """A small integer per row naming its image (rows of one image share it), in order of first appearance."""
    first: dict[Any, int] = {}
    return np.asarray([first.setdefault(key, len(first)) for key in image_keys(data)], dtype=np.int64)
