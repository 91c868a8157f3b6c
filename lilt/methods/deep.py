"""`deep`: append new trainable blocks of the tower's own type on top ("deep adapter", LilT).

Each new block starts as the identity, so the model's outputs are unchanged at step 0:
- pre-LN transformer blocks (ViT, Swin, T5): residual branches end in zeroed projections (attn.proj
  and mlp.fc2; T5's o and wo); a Swin stage contributes a copy of its last transformer block;
- post-LN blocks (BERT, RoBERTa, DistilBERT, MPNet): the LayerNorm inside the block prevents that, so
  the copy runs behind a gate, `x + g * (block(x) - x)` with g = 0 (ReZero-style);
- CNN stages (EfficientNet, ResNet, ConvNeXt): a new inverted-residual block with a skip and a zeroed
  last BatchNorm scale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..growth.ops import MAX_BLOCKS
from ..layers import GatedBlock, new_cnn_block, zero_
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method


@dataclass
class DeepOptions(ConfigBase):
    """Options of the `deep` method."""

    num_blocks: int = knob(1, "how many blocks to append")
    init: Literal["copy", "random"] = knob(
        "copy", "transformers: start from a copy of the last block ('copy') or fresh weights ('random'); "
        "CNN blocks are always fresh")

    def validate(self) -> None:
        if not 1 <= self.num_blocks <= MAX_BLOCKS:
            raise ConfigError(f"deep num_blocks={self.num_blocks} must be in [1, {MAX_BLOCKS}].")


def _reinit(module: nn.Module) -> None:
    # BERT/ViT-style init: N(0, 0.02) weights, zero biases, unit norms.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def activation_of(block: nn.Module) -> type[nn.Module]:
    """The first activation type used inside a block (ReLU when none is found)."""
    acts = [type(m) for m in block.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish))]
    return acts[0] if acts else nn.ReLU


def new_block(tower: Tower, source: nn.Module, init: str = "copy", identity: bool = True,
              channels: int | None = None) -> nn.Module:
    """A block of the tower's own kind built from `source` (a block without added modules).

    With `identity` its residual branch starts at zero, so inserting it anywhere leaves the tower's
    output unchanged; without, it is the same block with its output layers at their fresh initialization
    (what momentum inheritance mixes in).
    """
    layout = tower.require_layout("a new block (deep, depth growth)")
    if layout.kind == "cnn":
        if channels is None:
            channels = tower.block_channels(tower.num_blocks - 1)
        block = new_cnn_block(channels, activation_of(source), identity)
    elif layout.kind == "prenorm":
        # A stage of several units (Swin) contributes its last unit, which runs at the stage's resolution.
        units = getattr(source, layout.units, None) if layout.units else None
        block = copy.deepcopy(units[-1] if isinstance(units, (nn.Sequential, nn.ModuleList)) else source)
        for module in block.modules():
            # T5's first layer owns the relative-position table; the stem computes the bias once for all layers,
            # so a copy of that layer would carry a table that never trains.
            if getattr(module, "has_relative_attention_bias", False):
                module.has_relative_attention_bias = False
                del module.relative_attention_bias
        if init == "random":
            _reinit(block)
        if identity:
            for path in layout.residual_ends:
                zero_(block.get_submodule(path))
    elif layout.kind == "postnorm":
        inner = copy.deepcopy(source)
        if init == "random":
            _reinit(inner)
        block = GatedBlock(inner)
        if not identity:
            nn.init.ones_(block.gate)
    else:
        raise ConfigError(f"cannot build an identity-initialized block for {tower.kind} blocks of kind "
                          f"{tower.block_kind!r} (supported: prenorm, postnorm, cnn).")
    reference = next(source.parameters())
    block.to(device=reference.device, dtype=reference.dtype)
    if getattr(tower, "channels_last", False):
        block.to(memory_format=torch.channels_last)
    return block


@register_method("deep", DeepOptions)
def apply_deep(tower: Tower, selection: Selection, options: DeepOptions, tag: str) -> MethodResult:
    """Append new trainable blocks on top of the tower, initialized so its output is unchanged."""
    if selection.spec != "all":
        raise ConfigError(f"deep appends blocks on top of the tower; its `layers` must be 'all', "
                          f"not {selection.spec!r}.")
    tower.require_layout("the deep method")
    if not tower.blocks():
        raise ConfigError(f"deep: the {tower.kind} tower exposes no blocks to copy.")
    last = tower.blocks()[-1]
    if any(hasattr(m, "lilt_adapter") or isinstance(m, BaseTunerLayer) for m in last.modules()):
        raise ConfigError("deep copies the tower's last block, which already holds modules added by an earlier "
                          "rule; put the `deep` rule before adapter/lora/ia3 rules.")
    trainable: list[nn.Parameter] = []
    for _ in range(options.num_blocks):
        block = new_block(tower, last, options.init)
        block.requires_grad_(True)
        tower.extra_blocks.append(block)
        trainable.extend(block.parameters())
    return MethodResult(trainable=trainable)
