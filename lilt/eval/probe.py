"""Linear probe: logistic regression on frozen unit image embeddings (the CLIP paper's representation test).

The regularization strength C is chosen on a seeded 20% hold-out of the training rows, then the probe
is refitted on all of them; the test split is touched only once, for the reported accuracy.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import datasets
import numpy as np
import torch

from ..errors import ConfigError, DataError
from .zeroshot import embed_images, topk_hits

logger = logging.getLogger(__name__)

# Unit-norm embeddings have small coordinates (about 1/sqrt(D)), so the useful C range sits above the
# usual default of 1; the grid spans weak to strong regularization.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def _labels(data: datasets.Dataset, label_column: str, which: str) -> np.ndarray:
    if label_column not in data.column_names:
        raise DataError(f"{which} data has no label column {label_column!r} (columns: {data.column_names}); "
                        f"pass label_column=...")
    labels = np.asarray(data[label_column])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{which} label column {label_column!r} must hold one integer class per row, "
                        f"got dtype {labels.dtype}.")
    return labels


def _fit(features: np.ndarray, labels: np.ndarray, C: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000).fit(features, labels)


def choose_C(features: np.ndarray, labels: np.ndarray, grid: Sequence[float] = C_GRID, seed: int = 0) -> float:
    """The C of the grid with the best accuracy on a seeded 20% hold-out (the smallest C among ties)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_held = max(1, round(0.2 * len(labels)))
    held, fit = order[:n_held], order[n_held:]
    if len(np.unique(labels[fit])) < 2:
        raise DataError(f"too few training rows ({len(labels)}) to choose C on a hold-out: the fitting part has "
                        f"fewer than 2 classes; pass C=... or give more rows.")
    scores = [float((_fit(features[fit], labels[fit], C).predict(features[held]) == labels[held]).mean())
              for C in grid]
    logger.info("linear probe: hold-out accuracy per C %s", dict(zip(grid, np.round(scores, 4).tolist())))
    return float(grid[int(np.argmax(scores))])  # argmax takes the first best: the most regularized


def linear_probe(model: Any, train: datasets.Dataset, test: datasets.Dataset, *, label_column: str = "label",
                 image_column: str = "image", C: float | None = None, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0) -> dict[str, float]:
    """Top-1 (and top-5 with >= 5 classes) test accuracy in % of a logistic regression on frozen image embeddings."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError("linear_probe needs scikit-learn: pip install scikit-learn") from err
    if C is not None and not C > 0:
        raise ConfigError(f"C must be a positive inverse regularization strength, got {C!r}.")
    y_train, y_test = _labels(train, label_column, "train"), _labels(test, label_column, "test")
    if len(np.unique(y_train)) < 2:
        raise DataError(f"train data has a single class ({np.unique(y_train).tolist()}); a probe needs at least 2.")
    x_train = embed_images(model, train, image_column, batch_size, num_workers).numpy()
    x_test = embed_images(model, test, image_column, batch_size, num_workers).numpy()
    chosen = C if C is not None else choose_C(x_train, y_train, seed=seed)
    probe = _fit(x_train, y_train, chosen)
    # Scores over the classes seen in training; a test label never seen in training counts as a miss.
    scores = torch.from_numpy(probe.predict_log_proba(x_test))
    column = {int(c): i for i, c in enumerate(probe.classes_)}
    seen = torch.tensor([int(y) in column for y in y_test])
    index = torch.tensor([column.get(int(y), 0) for y in y_test])
    k = (1, 5) if len(probe.classes_) > 5 else (1,)  # top-5 of 5 classes would be trivially 100
    out = {f"top{kk}": 100.0 * float((topk_hits(scores, index, kk) * seen).mean()) for kk in k}
    out.update(C=chosen, train=len(y_train), test=len(y_test))
    return out


__all__ = ["C_GRID", "choose_C", "linear_probe"]
