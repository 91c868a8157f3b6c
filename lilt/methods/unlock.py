"""`unlock`: make selected parameters trainable: whole towers, top blocks, or their attention/MLP parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method

# Block-relative name prefixes of each part, per block kind.
_PARTS = {
    "prenorm": {"attention": ("norm1.", "attn.", "ls1."), "mlp": ("norm2.", "mlp.", "ls2.")},
    "postnorm": {"attention": ("attention.",), "mlp": ("intermediate.", "output.")},
}


@dataclass
class UnlockOptions(ConfigBase):
    """Options of the `unlock` method."""

    what: Literal["all", "attention", "mlp"] = knob(
        "all", "which part of each selected block: everything, the attention sublayer, or the MLP")


@register_method("unlock", UnlockOptions)
def apply_unlock(tower: Tower, selection: Selection, options: UnlockOptions, tag: str) -> MethodResult:
    """Make the selected parameters trainable (all of them, or each block's attention or MLP)."""
    if options.what == "all":
        trainable = [p for _, p in selection.named_parameters(tower)]
    else:
        parts = _PARTS.get(tower.block_kind, {}).get(options.what)
        if parts is None:
            raise ConfigError(f"unlock what={options.what!r} needs transformer blocks; the {tower.kind} tower's "
                              f"blocks are {tower.block_kind!r}. Use what='all' with a `layers` selection.")
        names = tower.block_names()
        trainable = []
        for i in selection.blocks:
            for rel, p in tower.blocks()[i].named_parameters():
                if rel.startswith(parts) and selection.contains(f"{names[i]}.{rel}"):
                    trainable.append(p)
    for p in trainable:
        p.requires_grad_(True)
    return MethodResult(trainable=trainable)
