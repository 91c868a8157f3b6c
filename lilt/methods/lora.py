"""`lora`: low-rank updates through peft's own LoRA layers (Hu et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig

from ..configbase import ConfigBase, knob
from ..errors import ConfigError
from ..towers.base import Tower
from ._peft import DEFAULT_LORA_TARGETS, inject, resolve_targets
from .base import MethodResult, Selection, register_method


@dataclass
class LoraOptions(ConfigBase):
    """Options of the `lora` method (passed to peft.LoraConfig)."""

    r: int = knob(8, "rank of the update")
    alpha: float = knob(16.0, "scaling numerator: the update is scaled by alpha / r")
    dropout: float = knob(0.0, "dropout on the LoRA branch input")
    target_modules: list[str] | None = knob(
        None, "block-relative module-name globs to wrap; None: attention q/v (BERT), attn.qkv/proj (ViT), "
        "1x1 convs (CNN)")

    def validate(self) -> None:
        if not 1 <= self.r <= 4096:
            raise ConfigError(f"lora r={self.r} must be in [1, 4096].")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout={self.dropout} must be in [0, 1).")


@register_method("lora", LoraOptions)
def apply_lora(tower: Tower, selection: Selection, options: LoraOptions, tag: str) -> MethodResult:
    """Wrap target Linear/Conv2d modules with LoRA (B zero-initialized: unchanged at step 0)."""
    targets = resolve_targets(tower, selection, options.target_modules, DEFAULT_LORA_TARGETS, "lora")
    for name in targets:  # a rank above the layer's own is not low-rank: a typo, and wasted memory
        module = tower.get_submodule(name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = module.weight
        width = min(weight.shape[0], weight.shape[1] * (weight.shape[2] * weight.shape[3] if weight.dim() == 4 else 1))
        if options.r > width:
            raise ConfigError(f"lora r={options.r} exceeds the rank {width} of {name} ({tuple(weight.shape)}); "
                              f"use r <= {width}.")

    def make_config(names: list[str]) -> LoraConfig:
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=names)

    return inject(tower, make_config, targets, f"lilt_{tag}")
