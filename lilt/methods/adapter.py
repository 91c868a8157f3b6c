"""`adapter`: bottleneck adapters `x + s * up(act(down(x)))` placed per block type (LilT, Houlsby).

Placement (serial, as LilT): in pre-LN transformer blocks (timm ViT) before each pre-LN,
`attn(norm1(adapter(x)))`; in post-LN blocks (BERT) after each dense sublayer and before its
LayerNorm; in CNNs a residual 1x1-conv bottleneck after each stage. The parallel variant (He et
al. 2022) adds `s * up(act(down(x)))` of a sublayer's input to its output instead.

Adapters are attached with forward hooks to the module they wrap and stored as its child
`lilt_adapter`, so the backbone's own parameter names never change (peft targets, checkpoints
and hashes keep working) and a deep copy of the model copies working adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..layers import Bottleneck, GatedBlock
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method


@dataclass
class AdapterOptions(ConfigBase):
    """Options of the `adapter` method."""

    reduction_factor: int = knob(4, "hidden width / bottleneck width (LilT: 4)")
    placement: Literal["serial", "parallel"] = knob("serial", "serial (LilT, Houlsby) or parallel (He et al.)")
    sites: Literal["both", "attention", "mlp"] = knob(
        "both", "transformer blocks: adapt after attention, after the MLP, or both (CNN stages have one site)")
    activation: Literal["gelu", "relu", "silu"] = knob("gelu", "bottleneck non-linearity (LilT: GELU)")
    scale: float = knob(1.0, "multiplier s of the adapter's output")
    zero_init: bool = knob(True, "initialize `up` to zero so the model is unchanged at step 0")

    def validate(self) -> None:
        if not 1 <= self.reduction_factor <= 4096:
            raise ConfigError(f"adapter reduction_factor={self.reduction_factor} must be in [1, 4096].")


# Hooks are plain functions reading `module.lilt_adapter`, so deep copies carry working adapters.
def _before_hook(module: nn.Module, args: tuple) -> tuple:
    """Serial, before a pre-LN: the norm sees x + adapter(x)."""
    x = args[0]
    return (x + module.lilt_adapter(x), *args[1:])


def _after_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Serial, after a sublayer: out + adapter(out)."""
    return output + module.lilt_adapter(output)


def _parallel_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Parallel: sublayer(x) + adapter(x)."""
    x = args[0] if args else next(iter(kwargs.values()))
    return output + module.lilt_adapter(x)


def _parallel_residual_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Parallel in a post-LN block: LayerNorm(dense(h) + x + adapter(x)), x being the residual input."""
    args = list(args)
    if len(args) >= 2:
        args[1] = args[1] + module.lilt_adapter(args[1])
    else:
        kwargs["input_tensor"] = kwargs["input_tensor"] + module.lilt_adapter(kwargs["input_tensor"])
    return tuple(args), kwargs


def _attach(module: nn.Module, adapter: Bottleneck, block_kind: str, placement: str) -> None:
    if hasattr(module, "lilt_adapter"):
        raise ConfigError(f"{type(module).__name__} already has an adapter from an earlier rule; "
                          "two adapter rules may not cover the same block.")
    module.lilt_adapter = adapter
    if placement == "parallel":
        if block_kind == "postnorm":
            module.register_forward_pre_hook(_parallel_residual_hook, with_kwargs=True)
        else:
            module.register_forward_hook(_parallel_hook, with_kwargs=True)
    elif block_kind == "prenorm":
        module.register_forward_pre_hook(_before_hook)
    else:
        module.register_forward_hook(_after_hook)


def _last_leaf_block(block: nn.Module) -> nn.Module:
    # A child added to an nn.Sequential would run as one more layer, so hook its last element instead.
    while isinstance(block, nn.Sequential) and len(block):
        block = block[-1]
    return block


@register_method("adapter", AdapterOptions)
def apply_adapter(tower: Tower, selection: Selection, options: AdapterOptions, tag: str) -> MethodResult:
    """Insert bottleneck adapters into every selected block (zero-initialized output by default)."""
    layout = tower.require_layout("the adapter method")
    sites = layout.parallel if options.placement == "parallel" else layout.serial
    if not sites:
        raise ConfigError(f"adapter placement={options.placement!r} is not available for the {tower.kind} tower's "
                          f"{tower.family} blocks; use placement='serial' (parallel: ViT, Swin, BERT-likes).")
    if options.sites != "both" and layout.kind != "cnn":
        sites = {options.sites: sites[options.sites]}
    trainable: list[nn.Parameter] = []
    for index in selection.blocks:
        dim = tower.block_channels(index)
        if options.reduction_factor > dim:
            raise ConfigError(f"adapter reduction_factor={options.reduction_factor} is wider than the "
                              f"{tower.kind} tower's width {dim} at block {index}: the bottleneck would be "
                              f"empty. Use reduction_factor <= {dim}.")
        for unit in tower.units(index):  # a Swin stage: each of its transformer blocks
            unit = unit.block if isinstance(unit, GatedBlock) else unit  # an appended BERT layer behind its gate
            for path in sites.values():
                module: Any = unit.get_submodule(path) if path else _last_leaf_block(unit)
                adapter = Bottleneck(dim, max(1, dim // options.reduction_factor), options.activation,
                                     options.scale, options.zero_init, conv=layout.kind == "cnn")
                reference = next(unit.parameters())
                adapter.to(device=reference.device, dtype=reference.dtype)
                _attach(module, adapter, layout.kind, options.placement)
                trainable.extend(adapter.parameters())
    return MethodResult(trainable=trainable)
