"""Keep NaN and infinity out of a run: a bad step is undone where it can be, and stops the run where it cannot.

A non-finite loss or gradient skips the optimizer step, and BatchNorm running statistics that the
forward pass updated (a CNN tower with `freeze_bn_stats: false`, or blocks a plan added) are put back
as they were before it. After every update the trainable weights and those statistics are checked:
non-finite values there stop the run with a NonFiniteError naming the tensor, before anything is saved.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import NonFiniteError


def updating_bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics that a forward pass in the model's current mode will update, by name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                value = getattr(module, key, None)
                if value is not None:
                    found[f"{name}.{key}"] = value
    return found


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all tensors together (non-finite iff one of them is)."""
    return float(torch.nn.utils.get_total_norm(tensors)) if tensors else 0.0


class FiniteGuard:
    """Snapshot the updating BatchNorm statistics before a step; restore them or fail loudly after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}

    def before_step(self) -> None:
        """Copy the statistics the coming forward passes will update (small: one vector per BatchNorm)."""
        self.saved = {name: value.detach().clone() for name, value in updating_bn_buffers(self.model).items()}

    def undo_step(self) -> None:
        """Put the statistics back as they were before the step (its loss or gradient was not finite)."""
        current = updating_bn_buffers(self.model)
        with torch.no_grad():
            for name, value in self.saved.items():
                if name in current:
                    current[name].copy_(value)

    def gradients_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether every gradient is finite (the same answer on every process: gradients are all-reduced)."""
        return bool(torch.isfinite(torch.tensor(total_norm([p.grad for p in params if p.grad is not None]))))

    def check_after_step(self, step: int, hint: str = "") -> None:
        """Raise NonFiniteError naming the first trainable weight or running statistic that is not finite."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        buffers = list(updating_bn_buffers(self.model).items())
        floats = [t.detach() for _, t in params + buffers if t.is_floating_point()]
        if torch.isfinite(torch.tensor(total_norm(floats))):
            return
        name = next(n for n, t in params + buffers if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        raise NonFiniteError(f"step {step}: {name} holds NaN or infinity after the update; the run stopped before "
                             f"saving it (the last checkpoint is intact). {hint}".rstrip())


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor` itself, or a NonFiniteError saying which embeddings hold NaN or infinity."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        rows = (~torch.isfinite(tensor)).flatten(1).any(1).nonzero().flatten().tolist() if tensor.dim() > 1 else []
        raise NonFiniteError(f"{what}: {len(rows) or 'some'} row(s) hold NaN or infinity (first rows: {rows[:5]}); "
                             "the model's weights or the inputs are broken. Scores are never computed from them.")
    return tensor


__all__ = ["FiniteGuard", "check_finite", "total_norm", "updating_bn_buffers"]
