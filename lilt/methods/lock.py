"""`lock`: freeze the selected parameters (LiT locks the whole image tower)."""

from __future__ import annotations

from ..configbase import ConfigBase
from ..towers.base import Tower
from .base import MethodResult, Selection, register_method


@register_method("lock")
def apply_lock(tower: Tower, selection: Selection, options: ConfigBase, tag: str) -> MethodResult:
    """Freeze every parameter in the selection (undoes earlier rules there)."""
    params = [p for _, p in selection.named_parameters(tower)]
    for p in params:
        p.requires_grad_(False)
    return MethodResult(frozen=params)
