"""Injecting peft tuners (LoRA, IA3) into a tower without disturbing what other rules decided."""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..lean import make_lean
from ..towers.base import LAYOUTS, Tower
from .base import MethodResult, Selection, block_module_names, block_targets
from ..errors import ConfigError

# Module types peft's LoRA and IA3 can wrap (a module an earlier rule wrapped can take another adapter).
PEFT_TYPES = (nn.Linear, nn.Conv2d, BaseTunerLayer)

# Default targets per backbone family, as block-relative module-name globs.
DEFAULT_LORA_TARGETS = {family: list(layout.lora) for family, layout in LAYOUTS.items()}


def whole_tower_targets(tower: Tower, selection: Selection, patterns: list[str], method: str) -> list[str]:
    """Tower module names matching a pattern anywhere in the backbone (towers without a block list)."""
    found = []
    for name, module in tower.named_modules():
        rel = name[len("backbone."):] if name.startswith("backbone.") else name
        if isinstance(module, PEFT_TYPES) and any(fnmatch.fnmatchcase(rel, p) for p in patterns) and any(
                selection.contains(f"{name}.{n}") for n, _ in module.named_parameters()):
            found.append(name)
    if not found:
        raise ConfigError(f"{method}: target_modules {patterns} match no Linear/Conv2d module of the {tower.kind} "
                          f"backbone {tower.source!r} (globs match module names such as 'stages.0.conv').")
    return found


def resolve_targets(tower: Tower, selection: Selection, patterns: list[str] | None,
                    defaults: dict[str, list[str]], method: str) -> list[str]:
    """Full tower module names a peft method will wrap, with a helpful error when none match."""
    if patterns is None:
        if tower.family not in defaults:
            raise ConfigError(f"{method}: no default target_modules for the {tower.kind} tower's {tower.family} "
                              "backbone; pass target_modules (module-name globs).")
        patterns = defaults[tower.family]
    if tower.layout is None:  # no block list: match names across the whole backbone
        return whole_tower_targets(tower, selection, patterns, method)
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
    if getattr(getattr(tower, "config", None), "lean_backward", False):
        make_lean(tower)  # peft's new LoRA layers, to their lean twins
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
