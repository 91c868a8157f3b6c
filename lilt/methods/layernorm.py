"""`layernorm`: train the affine terms of every normalization layer (LilT's 0.24% baseline)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..configbase import ConfigBase
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, BatchNorm, GroupNorm, RMSNorm, and model-specific variants named like them."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm2d"))


@register_method("layernorm")
def apply_layernorm(tower: Tower, selection: Selection, options: ConfigBase, tag: str) -> MethodResult:
    """Train the scale and shift of norm layers (BatchNorm statistics stay frozen)."""
    trainable = []
    for module_name, module in tower.named_modules():
        if not is_norm(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if selection.contains(f"{module_name}.{name}"):
                p.requires_grad_(True)
                trainable.append(p)
    return MethodResult(trainable=trainable)
