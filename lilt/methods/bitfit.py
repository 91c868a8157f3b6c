"""`bitfit`: train every bias term (BitFit, Ben Zaken et al. 2022; LilT's 0.31% baseline)."""

from __future__ import annotations

from ..configbase import ConfigBase
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method


@register_method("bitfit")
def apply_bitfit(tower: Tower, selection: Selection, options: ConfigBase, tag: str) -> MethodResult:
    """Train all bias parameters in the selection (norm shifts included)."""
    trainable = [p for n, p in selection.named_parameters(tower) if n.rsplit(".", 1)[-1] == "bias"]
    for p in trainable:
        p.requires_grad_(True)
    return MethodResult(trainable=trainable)
