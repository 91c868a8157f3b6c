"""WiSE-FT: weight-space interpolation between the start of tuning and the tuned model (Wortsman et al. 2022).

Fine-tuning buys in-distribution accuracy and often loses robustness; averaging the weights of the tuned
model with those it started from recovers much of what was lost at little in-distribution cost, and one
scalar `alpha` trades the two: theta = theta_0 + alpha * (theta_1 - theta_0).

theta_0 here is the *start of tuning* (`trainable_state` taken after the head warm-up, or right after
`apply_plan`), not random heads: there the heads are already fitted and every added module is at its
identity init (adapter `up`, LoRA `B` are zero), so alpha=0 is exactly the heads-only model, a sound model
in its own right. Interpolating toward random heads would blend in a model that retrieves at chance.
Only parameters that require grad move; frozen backbone weights are shared by both ends and so equal.
Buffers (BatchNorm statistics of blocks a plan added) are left as tuned.

This module is `interpolation`, not `interpolate`: a submodule named like the `lilt.interpolate` function
would replace that function on the package as soon as anything imported it (see lilt/__init__.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["choose_alpha", "interpolate", "interpolated", "trainable_state"]

M = TypeVar("M", bound=nn.Module)
MAX_ALPHA = 2.0  # past 1 extrapolates beyond the tuned weights; further than that is almost surely a typo

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter that requires grad: the reference (theta_0) for `interpolate`."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= MAX_ALPHA) or isinstance(alpha, bool):
        raise ConfigError(f"WiSE-FT alpha={alpha!r} must be a finite number in [0, {MAX_ALPHA:g}] "
                          f"(0: the reference weights, 1: the tuned weights, usually in between).")
    return value


def _paired(model: nn.Module, reference: Mapping[str, torch.Tensor]) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, parameter, reference tensor) for every trainable parameter, after checking names and shapes."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = {name for name, _ in params}
    missing = [name for name in names if name not in reference]
    if missing:
        raise ConfigError(f"the WiSE-FT reference has no tensor {sorted(missing)[0]!r} ({len(missing)} trainable "
                          f"tensor(s) missing); take it with trainable_state(model) after apply_plan and growth, "
                          f"just before tuning.")
    extra = [name for name in reference if name not in names]
    if extra:
        raise ConfigError(f"the WiSE-FT reference holds {sorted(extra)[0]!r} ({len(extra)} tensor(s) in all), which "
                          f"the model does not train; it was taken from another model or plan.")
    for name, p in params:
        if tuple(reference[name].shape) != tuple(p.shape):
            raise ConfigError(f"the WiSE-FT reference's {name!r} has shape {tuple(reference[name].shape)} but the "
                              f"model's has {tuple(p.shape)} (grown since?); take the reference after growth.")
    return [(name, p, reference[name]) for name, p in params]


def interpolate(model: M, alpha: float, reference: Mapping[str, torch.Tensor]) -> M:
    """In place, move every trainable tensor p to reference + alpha * (p - reference); returns the model."""
    alpha = _check_alpha(alpha)
    with torch.no_grad():
        for _, p, ref in _paired(model, reference):
            # lerp is exact at both ends (it computes end - (end - start) * (1 - w) for w >= 0.5), so
            # alpha=1 leaves the tuned weights and alpha=0 restores the reference bit for bit.
            p.copy_(torch.lerp(ref.to(p.device, p.dtype), p, alpha))
    return model


@contextmanager
def interpolated(model: M, alpha: float, reference: Mapping[str, torch.Tensor]) -> Iterator[M]:
    """Within the block the model is interpolated at `alpha`; the tuned weights are restored on exit."""
    alpha = _check_alpha(alpha)
    _paired(model, reference)  # refuse before saving anything
    with torch.no_grad():
        tuned = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    try:
        yield interpolate(model, alpha, reference)
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in tuned:
                    p.copy_(tuned[name])


def choose_alpha(model: nn.Module, reference: Mapping[str, torch.Tensor], score_fn: Callable[[nn.Module], float],
                 alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[float, dict[float, float]]:
    """Score the model at each alpha (higher is better), leave it at the best one; returns (best, scores)."""
    if not alphas:
        raise ConfigError("choose_alpha needs at least one alpha, e.g. (0.0, 0.25, 0.5, 0.75, 1.0).")
    alphas = [_check_alpha(a) for a in alphas]  # refuse a bad one before spending any evaluation
    _paired(model, reference)
    scores: dict[float, float] = {}
    for alpha in alphas:
        with interpolated(model, alpha, reference):
            scores[alpha] = float(score_fn(model))

    # A non-finite score (a diverged evaluation) never wins; ties go to the larger alpha, the more tuned model.
    def rank(a: float) -> tuple[float, float]:
        return (scores[a] if math.isfinite(scores[a]) else -math.inf, a)

    best = max(scores, key=rank)
    interpolate(model, best, reference)
    return best, scores
