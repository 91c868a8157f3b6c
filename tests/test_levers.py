"""Generalization levers wired into training: heads from the ridge map, keep_best, WiSE-FT alphas, and resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import lilt
from lilt.baselines import fit_ridge, heads_from_ridge, pair_features
from lilt.config import ConfigError, DataConfig, GrowthStage, TrainConfig
from lilt.data.resolve import resolve_data
from lilt.interpolation import trainable_state
from lilt.training import SCORE, train

from helpers import LWA, NO_DROPOUT, max_difference

DATA = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 48})


def _model(make_model):
    model = make_model("vit", text_options={**NO_DROPOUT, "pooling": "mean"})
    lilt.apply_plan(model, LWA)
    return model


def _config(tmp_path: Path, **options) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=0, report_to=[], log_every=1,
                output_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **options})


def test_wise_alpha_zero_ends_at_the_start_of_tuning(make_model, tmp_path: Path) -> None:
    model = _model(make_model)
    start = trainable_state(model)
    result = train(model, DATA, _config(tmp_path, wise_alphas=[0.0]))
    assert result.metrics["wise_alpha"] == 0.0
    assert max_difference(start, trainable_state(model)) == 0.0
    saved = lilt.DualEncoder.from_pretrained(tmp_path / "run" / "model")
    assert max_difference(start, trainable_state(saved)) == 0.0  # the saved model is the interpolated one


def test_wise_picks_the_best_alpha_on_validation(make_model, tmp_path: Path) -> None:
    model = _model(make_model)
    start = trainable_state(model)
    result = train(model, DATA, _config(tmp_path, wise_alphas=[0.0, 0.5, 1.0]))
    scores = {a: result.metrics[f"wise/{a:g}"] for a in (0.0, 0.5, 1.0)}
    best = result.metrics["wise_alpha"]
    assert scores[best] == max(scores.values()) and result.metrics[SCORE] == pytest.approx(scores[best])
    moved = max_difference(start, trainable_state(model))
    assert (moved == 0.0) == (best == 0.0)


def test_keep_best_ends_with_the_best_validation_score(make_model, tmp_path: Path) -> None:
    model = _model(make_model)
    # A learning rate far too high: later evaluations are likely worse than earlier ones.
    result = train(model, DATA, _config(tmp_path, steps=8, lr=0.3, eval_every=2, keep_best=True))
    scores = [h[SCORE] for h in result.history if SCORE in h]
    assert result.metrics[SCORE] == pytest.approx(max(scores))
    if "best_step" in result.metrics:
        assert result.metrics["best_step"] in (2, 4, 6)


def test_head_init_ridge_sets_the_heads_from_the_ridge_map(make_model, tmp_path: Path) -> None:
    model = _model(make_model)
    expected = _model(make_model)
    train_data, val, _ = resolve_data(None, DATA, 0)
    features = pair_features(expected, train_data)
    heads_from_ridge(expected, fit_ridge(features, val=pair_features(expected, val)), features.texts)
    train(model, DATA, _config(tmp_path, steps=1, lr=0.0, head_init="ridge"))
    for name in ("vision_proj", "text_proj"):
        assert torch.allclose(getattr(model, name).weight, getattr(expected, name).weight, atol=1e-6)


def test_resume_replays_reference_and_best(make_model, tmp_path: Path) -> None:
    options = dict(steps=6, eval_every=2, save_every=3, keep_checkpoints=0, keep_best=True, wise_alphas=[0.5, 1.0])
    whole = _model(make_model)
    train(whole, DATA, _config(tmp_path, **options))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-6")
    shutil.rmtree(resumed_dir / "model")
    assert (resumed_dir / "checkpoints" / "step-3" / "reference.safetensors").is_file()
    resumed = _model(make_model)
    result = train(resumed, DATA, _config(tmp_path, output_dir=str(resumed_dir), resume="auto", **options))
    assert result.resumed_from == 3
    assert max_difference(trainable_state(whole), trainable_state(resumed)) == 0.0


def test_bad_lever_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"wise_alphas=\[3.0\]"):
        TrainConfig(wise_alphas=[3.0])
    with pytest.raises(ConfigError, match="head_init"):
        TrainConfig.from_dict({"head_init": "pca"})
    with pytest.raises(ConfigError, match="growth stages"):
        TrainConfig(steps=4, keep_best=True, growth=[GrowthStage(steps=4)])


def test_language_balanced_sampling_draws_languages_by_n_to_the_alpha(make_model, tmp_path: Path) -> None:
    from lilt.data.loader import EpochSampler, language_weights

    langs = ["en"] * 900 + ["sw"] * 100
    weights = language_weights(langs, 0.3)
    share = float(weights[900:].sum() / weights.sum())
    assert share == pytest.approx(100 ** 0.3 / (900 ** 0.3 + 100 ** 0.3))  # 0.34, not the data's 0.10
    assert float(language_weights(langs, 1.0)[900:].sum() / language_weights(langs, 1.0).sum()) == pytest.approx(0.1)
    sampler = EpochSampler(1000, seed=5, weights=weights)
    drawn = [row for _, row in sampler]
    assert drawn == [row for _, row in sampler]  # the same epoch draws the same rows (exact resume)
    assert abs(sum(r >= 900 for r in drawn) / 1000 - share) < 0.05
    sampler.set_epoch(1)
    assert drawn != [row for _, row in sampler]
    with pytest.raises(ConfigError, match="lang_sampling=1.5"):
        DataConfig(lang_sampling=1.5)
    model = _model(make_model)  # and a run with it trains
    result = train(model, DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 48}, lang_sampling=0.0),
                   _config(tmp_path, steps=3))
    assert result.steps == 3
