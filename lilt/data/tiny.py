"""`builtin:tiny-random`: a few random images with random captions, built in memory, for tests."""

from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from ..errors import DataError

_WORDS = ("red", "green", "blue", "small", "large", "cat", "dog", "car", "tree", "bird", "house", "boat")
_LANGS = ("en", "sw", "yo")


def load_tiny_random(split: str = "train", n: int = 64, image_size: int = 32, seed: int = 0,
                     **unused: object) -> datasets.Dataset:
    """`n` random RGB PNG images, each with a random 3-word caption and a language; seeded by split."""
    if unused:
        raise DataError(f"builtin:tiny-random takes n, image_size and seed; got also {sorted(unused)}.")
    offset = {"train": 0, "validation": 1, "test": 2}
    if split not in offset:
        raise DataError(f"builtin:tiny-random has splits {list(offset)}; got {split!r}.")
    rng = np.random.default_rng(seed * 3 + offset[split])
    pixels = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    images = []
    for array in pixels:  # 64 tiny PNGs: the loop costs milliseconds
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    words = rng.choice(_WORDS, size=(n, 3))
    features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string"),
                                  "lang": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": [" ".join(w) for w in words],
                                       "lang": [_LANGS[i % len(_LANGS)] for i in range(n)]}, features=features)
