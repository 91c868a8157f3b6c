"""Linear probe on frozen image embeddings: separable labels are learned, shuffled labels stay at chance."""

from __future__ import annotations

import numpy as np
import pytest

from lilt.config import ConfigError, DataError
from lilt.eval.probe import C_GRID, choose_C, linear_probe

from helpers import FakeModel, colour_data

pytest.importorskip("sklearn")

# Six classes at the corners of the colour cube: their mean colours point in six different directions.
CORNERS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


def jittered(n: int, seed: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """n images of random classes, each colour moved by up to +-25 per channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CORNERS), n).tolist()
    colours = [tuple(int(v) for v in np.clip(np.array(CORNERS[c]) + rng.integers(-25, 26, 3), 0, 255))
               for c in labels]
    return colours, labels


def test_separable_labels_are_learned_and_shuffled_ones_are_not() -> None:
    train, test = colour_data(*jittered(120, 0)), colour_data(*jittered(120, 1))
    out = linear_probe(FakeModel(), train, test, batch_size=64)
    assert out["top1"] >= 95 and out["top5"] >= out["top1"]
    assert out["C"] in C_GRID and out["train"] == 120 and out["test"] == 120
    # Same images, labels drawn independently of them: nothing to learn, chance is 1/6 = 17%.
    rng = np.random.default_rng(2)
    shuffled_train = train.map(lambda r: {"label": int(rng.integers(0, 6))})
    shuffled_test = test.map(lambda r: {"label": int(rng.integers(0, 6))})
    chance = linear_probe(FakeModel(), shuffled_train, shuffled_test, batch_size=64)
    assert chance["top1"] < 35


def test_fixed_C_is_used_and_top5_needs_more_than_five_classes() -> None:
    colours, labels = jittered(60, 3)
    three = [(c, y % 3) for c, y in zip(colours, labels)]  # 3 classes: corners c and c + 3 share a label
    data = colour_data([c for c, _ in three], [y for _, y in three])
    out = linear_probe(FakeModel(), data, data, C=10.0)
    assert out["C"] == 10.0 and "top5" not in out
    # C is really passed on: a tiny C (strong regularization) cannot fit the six classes, a large one can.
    train, test = colour_data(*jittered(60, 4)), colour_data(*jittered(60, 5))
    underfit = linear_probe(FakeModel(), train, test, C=1e-4)
    fitted = linear_probe(FakeModel(), train, test, C=100.0)
    assert fitted["top1"] >= 95 and underfit["top1"] < 50


def test_choose_C_picks_weak_regularization_when_classes_are_close() -> None:
    # Unit features that share one big common direction and differ by a small class offset: a strongly
    # regularized probe sees them as one class, so the hold-out must steer C up.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    features = np.ones(8) + 0.3 * np.eye(8)[labels] + 0.02 * rng.standard_normal((200, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    chosen = choose_C(features, labels)
    assert chosen >= 1.0 and chosen == choose_C(features, labels)  # seeded hold-out: the same choice
    assert choose_C(features, labels, grid=(0.01,)) == 0.01


def test_errors_name_the_problem() -> None:
    data = colour_data(*jittered(20, 0))
    with pytest.raises(DataError, match="no label column 'y'"):
        linear_probe(FakeModel(), data, data, label_column="y")
    with pytest.raises(DataError, match="single class"):
        linear_probe(FakeModel(), data.map(lambda r: {"label": 0}), data)
    with pytest.raises(ConfigError, match="C must be a positive"):
        linear_probe(FakeModel(), data, data, C=0)
