"""`ia3`: learned rescaling vectors through peft's IA3 layers (Liu et al. 2022)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from peft import IA3Config

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..towers.base import LAYOUTS, Tower
from ._peft import inject, resolve_targets
from .base import MethodResult, Selection, register_method, short_name

# Per backbone family; the last default target is the feed-forward one (its input is rescaled).
DEFAULT_IA3_TARGETS = {family: list(layout.ia3) for family, layout in LAYOUTS.items() if layout.ia3}
DEFAULT_IA3_FEEDFORWARD = {family: targets[-1:] for family, targets in DEFAULT_IA3_TARGETS.items()}


@dataclass
class IA3Options(ConfigBase):
    """Options of the `ia3` method (passed to peft.IA3Config)."""

    target_modules: list[str] | None = knob(None, "block-relative module-name globs to rescale; None: per "
                                            "block kind (BERT: key, value, output.dense; ViT: attn.qkv, mlp.fc2)")
    feedforward_modules: list[str] | None = knob(
        None, "which targets are feed-forward (their input is rescaled rather than their output)")

    def validate(self) -> None:
        if self.feedforward_modules is not None and self.target_modules is not None:
            stray = [f for f in self.feedforward_modules if f not in self.target_modules]
            if stray:
                raise ConfigError(f"ia3 feedforward_modules {stray} are not among target_modules "
                                  f"{self.target_modules}; a feed-forward module must also be a target.")


@register_method("ia3", IA3Options)
def apply_ia3(tower: Tower, selection: Selection, options: IA3Options, tag: str) -> MethodResult:
    """Rescale activations of target modules with vectors initialized to one (unchanged at step 0)."""
    targets = resolve_targets(tower, selection, options.target_modules, DEFAULT_IA3_TARGETS, "ia3")
    ff_patterns = options.feedforward_modules
    if ff_patterns is None:
        ff_patterns = DEFAULT_IA3_FEEDFORWARD.get(tower.family, []) if options.target_modules is None else []
    names = tower.block_names()

    def is_feedforward(full: str) -> bool:
        rel = next((full[len(b) + 1:] for b in names if full.startswith(b + ".")), short_name(full))
        return any(fnmatch.fnmatchcase(rel, p) for p in ff_patterns)

    def make_config(found: list[str]) -> IA3Config:
        return IA3Config(target_modules=found, feedforward_modules=[t for t in found if is_feedforward(t)])

    return inject(tower, make_config, targets, f"lilt_{tag}")
