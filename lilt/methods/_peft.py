"""Injecting peft tuners (LoRA, IA3) into a tower without disturbing what other rules decided."""

from __future__ import annotations

import warnings
from typing import Callable

from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..towers.base import Tower
from .base import MethodResult, Selection, block_module_names, block_targets
from ..errors import ConfigError

# Module types peft's LoRA and IA3 can wrap (a module an earlier rule wrapped can take another adapter).
PEFT_TYPES = (nn.Linear, nn.Conv2d, BaseTunerLayer)

# Default targets per block kind, as block-relative module-name globs.
DEFAULT_LORA_TARGETS = {
    "prenorm": ["attn.qkv", "attn.proj"],
    "postnorm": ["attention.self.query", "attention.self.value"],
    "cnn": ["*conv_pw", "*conv_pwl"],
}


def resolve_targets(tower: Tower, selection: Selection, patterns: list[str] | None,
                    defaults: dict[str, list[str]], method: str) -> list[str]:
    """Full tower module names a peft method will wrap, with a helpful error when none match."""
    if patterns is None:
        if tower.block_kind not in defaults:
            raise ConfigError(f"{method}: no default target_modules for {tower.kind} blocks of kind "
                              f"{tower.block_kind!r}; pass target_modules (block-relative globs).")
        patterns = defaults[tower.block_kind]
    targets = block_targets(tower, selection, patterns, PEFT_TYPES)
    if not targets and selection.blocks:
        options = block_module_names(tower, selection.blocks[0], PEFT_TYPES)
        raise ConfigError(f"{method}: target_modules {patterns} match no Linear/Conv2d module in the selected "
                          f"{tower.kind} blocks. Block-relative names there: {', '.join(options[:12])}.")
    return targets


def inject(tower: Tower, make_config: Callable[[list[str]], PeftConfig], targets: list[str],
           adapter_name: str) -> MethodResult:
    """Inject a peft adapter into `targets`, keeping every other parameter's requires_grad as it was."""
    before = {p: p.requires_grad for p in tower.parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # several rules -> several adapters
        inject_adapter_in_model(make_config(targets), tower, adapter_name=adapter_name)
    # Several rules may wrap the same module: keep all their adapters active, not only the newest.
    for module in tower.modules():
        if isinstance(module, BaseTunerLayer) and len(module.active_adapters) < len(_adapter_names(module)):
            module.set_adapter(_adapter_names(module))
    # peft marks only its own adapters trainable; restore what earlier rules decided.
    added = []
    for p in tower.parameters():
        if p in before:
            p.requires_grad_(before[p])
        else:
            p.requires_grad_(True)
            added.append(p)
    return MethodResult(trainable=added)


def _adapter_names(layer: BaseTunerLayer) -> list[str]:
    names: list[str] = []
    for attr in layer.adapter_layer_names:
        names.extend(k for k in getattr(layer, attr).keys() if k not in names)
    return names
