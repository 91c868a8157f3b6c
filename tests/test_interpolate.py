"""lilt.interpolation: WiSE-FT weight-space interpolation between the start of tuning and the tuned model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LWA, clip_loss, embeddings, sample_batch
from torch import nn

import lilt
from lilt.interpolation import choose_alpha, interpolate, interpolated, trainable_state


def _toy() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A frozen layer and a trainable one, its reference, and the 'tuned' values it was moved to."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    reference = trainable_state(model)
    with torch.no_grad():
        for p in model[1].parameters():  # fresh values, not ref + noise: ref + 1 * (p - ref) would then round
            p.copy_(torch.randn_like(p) * 0.37)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, reference, tuned


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_trainable_state_is_a_detached_cpu_copy_of_trainable_parameters_only() -> None:
    model, reference, tuned = _toy()
    assert set(reference) == {"1.weight", "1.bias"}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in reference.values())
    assert not torch.equal(reference["1.weight"], tuned["1.weight"]), "moving the model did not move the reference"


def test_alpha_0_is_the_reference_1_the_tuned_model_and_half_the_midpoint() -> None:
    model, reference, tuned = _toy()
    interpolate(model, 1.0, reference)
    _assert_equal(_params(model), tuned)  # bit-exact

    interpolate(model, 0.5, reference)
    for name in reference:
        torch.testing.assert_close(model.get_parameter(name), (reference[name] + tuned[name]) / 2)
    assert torch.equal(model[0].weight, tuned["0.weight"]), "frozen weights never move"

    model.load_state_dict(tuned)
    assert interpolate(model, 0.0, reference) is model
    _assert_equal({n: model.get_parameter(n).detach() for n in reference}, reference)
    assert torch.equal(model[0].weight, tuned["0.weight"])

    model.load_state_dict(tuned)
    interpolate(model, 2.0, reference)  # extrapolation is allowed
    torch.testing.assert_close(model[1].bias, 2 * tuned["1.bias"] - reference["1.bias"])


def test_interpolated_restores_the_tuned_weights_even_after_an_error() -> None:
    model, reference, tuned = _toy()
    with interpolated(model, 0.0, reference) as inside:
        assert inside is model and torch.equal(model[1].weight, reference["1.weight"])
    _assert_equal(_params(model), tuned)
    with pytest.raises(RuntimeError, match="scoring failed"):
        with interpolated(model, 0.25, reference):
            assert not torch.equal(model[1].weight, tuned["1.weight"])
            raise RuntimeError("scoring failed")
    _assert_equal(_params(model), tuned)


def test_choose_alpha_picks_the_best_score_and_leaves_the_model_there() -> None:
    model, reference, tuned = _toy()
    target = reference["1.weight"] + 0.6 * (tuned["1.weight"] - reference["1.weight"])
    seen = []

    def score(m: nn.Module) -> float:
        seen.append(m[1].weight.detach().clone())
        return -float((m[1].weight.detach() - target).abs().sum())  # best at alpha=0.6; of the grid, 0.5 is nearest

    best, scores = choose_alpha(model, reference, score)
    assert best == 0.5 and list(scores) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert max(scores, key=scores.get) == 0.5 and len(seen) == 5
    assert torch.equal(seen[0], reference["1.weight"]) and torch.equal(seen[-1], tuned["1.weight"])
    expected = _toy()[0]
    interpolate(expected, 0.5, reference)
    _assert_equal(_params(model), _params(expected))


def test_choose_alpha_breaks_ties_toward_the_larger_alpha_and_never_picks_a_non_finite_score() -> None:
    model, reference, tuned = _toy()
    best, _ = choose_alpha(model, reference, lambda m: 1.0, alphas=(0.0, 0.5, 0.25))
    assert best == 0.5
    scores = iter([0.1, math.nan, 0.2, math.inf])
    best, got = choose_alpha(model, reference, lambda m: next(scores), alphas=(0.0, 0.25, 0.5, 1.0))
    assert best == 0.5 and math.isnan(got[0.25])
    model.load_state_dict(tuned)
    best, _ = choose_alpha(model, reference, lambda m: 0.0)
    assert best == 1.0
    _assert_equal(_params(model), tuned)


@pytest.mark.parametrize("alpha", [-0.1, math.nan, math.inf, 2.5, "half", True])
def test_a_bad_alpha_is_a_one_line_config_error_and_changes_nothing(alpha) -> None:
    model, reference, tuned = _toy()
    for call in (lambda: interpolate(model, alpha, reference),
                 lambda: interpolated(model, alpha, reference).__enter__(),
                 lambda: choose_alpha(model, reference, lambda m: 0.0, alphas=(0.0, alpha))):
        with pytest.raises(lilt.ConfigError, match=r"alpha=.*must be a finite number in \[0, 2\]") as error:
            call()
        assert "\n" not in str(error.value) and repr(alpha) in str(error.value)
    _assert_equal(_params(model), tuned)


def test_a_reference_that_does_not_fit_the_model_names_the_tensor() -> None:
    model, reference, tuned = _toy()
    cases = {
        "missing": ({"1.weight": reference["1.weight"]}, r"reference has no tensor '1\.bias'"),
        "extra": ({**reference, "0.weight": tuned["0.weight"]}, r"holds '0\.weight'.*does not train"),
        "shape": ({**reference, "1.bias": torch.zeros(4)}, r"'1\.bias' has shape \(4,\).*\(3,\)"),
    }
    for bad, pattern in cases.values():
        for call in (lambda: interpolate(model, 0.0, bad), lambda: choose_alpha(model, bad, lambda m: 0.0)):
            with pytest.raises(lilt.ConfigError, match=pattern) as error:
                call()
            assert "\n" not in str(error.value)
    _assert_equal(_params(model), tuned)
    model[0].requires_grad_(True)  # unfrozen after the reference was taken
    with pytest.raises(lilt.ConfigError, match=r"no tensor '0\.bias' \(2 trainable"):
        interpolate(model, 0.0, reference)


def test_the_package_exports_the_functions_not_the_module() -> None:
    import lilt.interpolation  # importing the submodule must not shadow lilt.interpolate

    assert lilt.interpolate is interpolate and callable(lilt.interpolate)
    assert lilt.interpolated is interpolated and lilt.choose_alpha is choose_alpha
    assert lilt.trainable_state is trainable_state


def test_alpha_0_from_a_reference_taken_after_apply_plan_gives_the_untrained_embeddings(make_model) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, LWA)  # adapters in both towers at their identity init, plus the norms
    images, text = sample_batch(model)
    before = embeddings(model, images, text)
    reference = trainable_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # two steps: a zero-initialized adapter `up` gives `down` a gradient only after one
        optimizer.zero_grad()
        clip_loss(model, images, text).backward()
        optimizer.step()
    tuned = embeddings(model, images, text)
    assert all((t - b).abs().max() > 1e-3 for t, b in zip(tuned, before)), "training changed both towers"

    with interpolated(model, 0.0, reference):
        for got, b in zip(embeddings(model, images, text), before):
            torch.testing.assert_close(got, b, atol=1e-6, rtol=0)
    for got, t in zip(embeddings(model, images, text), tuned):
        torch.testing.assert_close(got, t, atol=1e-6, rtol=0)

    def closeness(m: nn.Module) -> float:  # a stand-in for validation recall: highest at the untrained model
        return -sum(float((e - b).abs().sum()) for e, b in zip(embeddings(m, images, text), before))

    best, scores = choose_alpha(model, reference, closeness, alphas=(1.0, 0.5, 0.0))
    assert best == 0.0 and scores[0.0] > scores[0.5] > scores[1.0]
    for got, b in zip(embeddings(model, images, text), before):
        torch.testing.assert_close(got, b, atol=1e-6, rtol=0)
