"""Widening helpers: how many units a factor gives, which old unit each new one copies, a resized layer."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class Widening:
    """How a widened tensor maps onto its old self: along `dim`, new index j came from old index source[j]."""

    dim: int
    source: torch.Tensor  # LongTensor, len = new size
    old_size: int


def grown_size(old: int, factor: float) -> int:
    """Units after widening `old` by `factor` (at least one more)."""
    new = int(math.ceil(old * factor))
    if new <= old:
        raise ConfigError(f"width factor {factor} does not widen {old} units.")
    return new


def unit_sources(old: int, new: int) -> torch.Tensor:
    """For each of `new` units, the old unit it starts from."""
    # New unit j copies old unit (j - old) mod old: every old unit is copied as evenly as possible.
    return torch.cat([torch.arange(old), torch.arange(new - old) % old])


def resized(module: nn.Module, dim: int, size: int) -> nn.Module:
    """A fresh module like `module` with `size` units along dim (0: outputs, 1: inputs)."""
    ref = module.weight
    if isinstance(module, nn.Linear):
        i, o = module.in_features, module.out_features
        wide = nn.Linear(size if dim == 1 else i, size if dim == 0 else o, bias=module.bias is not None)
    elif isinstance(module, nn.Conv2d):
        grouped = module.groups == module.in_channels == module.out_channels and module.groups > 1
        i, o = module.in_channels, module.out_channels
        i, o = (size, size) if grouped else (size if dim == 1 else i, size if dim == 0 else o)
        wide = nn.Conv2d(i, o, module.kernel_size, module.stride, module.padding, module.dilation,
                         groups=size if grouped else module.groups, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        wide = copy.deepcopy(module)
        wide.num_features = size
        for pname in ("weight", "bias"):
            if getattr(module, pname, None) is not None:
                setattr(wide, pname, nn.Parameter(torch.ones(size) if pname == "weight" else torch.zeros(size)))
        for bname in ("running_mean", "running_var"):
            if getattr(module, bname, None) is not None:
                wide.register_buffer(bname, torch.zeros(size) if bname == "running_mean" else torch.ones(size))
    else:
        raise ConfigError(f"width growth cannot widen a {type(module).__name__}.")
    wide = wide.to(device=ref.device, dtype=ref.dtype)
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        wide = wide.to(memory_format=torch.channels_last)
    wide.requires_grad_(module.weight.requires_grad)
    return wide
