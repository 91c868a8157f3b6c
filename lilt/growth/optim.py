"""Optimizer state across growth: carry AdamW moments over to the grown model's parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .widen import Widening

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def migrate_optimizer_state(old: torch.optim.Optimizer, old_names: dict[nn.Parameter, str],
                            new: torch.optim.Optimizer, new_model: nn.Module,
                            widened: dict[str, Widening] | None = None, mode: str = "migrate") -> int:
    """Carry Adam state from `old` (params named by `old_names`) into `new` over the grown model's params.

    Kept tensors keep their moments and step count. A widened tensor keeps its old slices; its new slices
    start at zero (`mode='migrate'`) or with the moments of the units they copy (`mode='copy'`). Brand-new
    tensors have no state, so AdamW starts them from scratch. Returns how many tensors carried state.
    """
    widened = widened or {}
    by_name = {old_names[p]: state for p, state in old.state.items() if p in old_names and state}
    carried = 0
    for name, param in new_model.named_parameters():
        state = by_name.get(name)
        if state is None or not param.requires_grad:
            continue
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0 or key not in ADAM_MOMENTS:
                moved[key] = value.clone() if torch.is_tensor(value) else value
                continue
            if name in widened and value.shape != param.shape:
                w = widened[name]
                grown = value.index_select(w.dim, w.source.to(value.device))
                if mode != "copy":
                    keep = (torch.arange(len(w.source), device=value.device) < w.old_size)
                    shape = [1] * grown.dim()
                    shape[w.dim] = len(w.source)
                    grown = grown * keep.view(shape).to(grown.dtype)
                value = grown
            if value.shape != param.shape:
                raise RuntimeError(f"internal error: optimizer state {key} of {name} has shape "
                                   f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
            moved[key] = value.clone()
        new.state[param] = moved
        carried += 1
    return carried
