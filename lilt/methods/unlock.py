"""`unlock`: make selected parameters trainable: whole towers, top blocks, or their attention/MLP parts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method


@dataclass
class UnlockOptions(ConfigBase):
    """Options of the `unlock` method."""

    what: Literal["all", "attention", "mlp"] = knob(
        "all", "which part of each selected block: everything, the attention sublayer, or the MLP")


@register_method("unlock", UnlockOptions)
def apply_unlock(tower: Tower, selection: Selection, options: UnlockOptions, tag: str) -> MethodResult:
    """Make the selected parameters trainable (all of them, or each block's attention or MLP)."""
    if options.what == "all":
        if selection.prefixes is not None:  # top:K, blocks.I-J: a block list only known families have
            tower.require_layout(f"unlock layers={selection.spec!r}")
        trainable = [p for _, p in selection.named_parameters(tower)]
    else:
        layout = tower.require_layout(f"unlock what={options.what!r}")
        parts = layout.parts.get(options.what)
        if parts is None:
            raise ConfigError(f"unlock what={options.what!r} needs transformer blocks; the {tower.kind} tower's "
                              f"{tower.family} blocks are {tower.block_kind!r}. Use what='all' with a `layers` "
                              "selection.")
        # Inside a stage of several units (Swin), a part's names follow the unit's index: blocks.3.attn.qkv.
        unit = re.compile(rf"^{re.escape(layout.units)}\.\d+\.") if layout.units else None
        names = tower.block_names()
        trainable = []
        for i in selection.blocks:
            for rel, p in tower.blocks()[i].named_parameters():
                inner = unit.sub("", rel) if unit is not None else rel
                if inner.startswith(parts) and selection.contains(f"{names[i]}.{rel}"):
                    trainable.append(p)
    for p in trainable:
        p.requires_grad_(True)
    return MethodResult(trainable=trainable)
