"""Text-tower swap: keep a trained model's vision side, put a different text backbone under it.

The situation: a model was aligned on English (or on one language) and a better text model for a new
language appears, or the text side should be re-learned for that language alone. `swap_text_tower`
builds a model with the same vision tower (backbone, the plan's vision-side modules with their trained
values, and the vision head), all of it frozen, and a new text backbone with a fresh text head and the
text-side methods of a plan. Training it then re-learns only the text side, against image embeddings
that stay exactly where they were: earlier text towers' embeddings remain comparable with them.

The result is an ordinary DualEncoder whose plan records the vision rules (then a lock) and the text
rules, so `save_pretrained` / `from_pretrained` rebuild it like any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, TextConfig
from .errors import ConfigError
from .model import DualEncoder
from .plan import Rule, TuningPlan, apply_plan

KEPT_PREFIXES = ("vision.", "vision_proj.")


def swap_plan(old: TuningPlan | None, text_plan: TuningPlan | None = None) -> TuningPlan:
    """The swapped model's plan: the old vision-side rules, a lock over the vision tower, then text rules."""
    old_rules = old.rules if old is not None else []
    # Each vision rule keeps its index: methods name their modules after it (LoRA's lilt_r2, ...), and the
    # saved tensors must land in the same places. Text-only rules become a harmless vision lock there.
    vision = [dataclasses.replace(r, tower="vision") if r.tower in ("vision", "both") else
              Rule(tower="vision", method="lock") for r in old_rules]
    source = text_plan.rules if text_plan is not None else old_rules
    text = [dataclasses.replace(r, tower="text") for r in source if r.tower in ("text", "both")]
    if not text:
        raise ConfigError("the swap leaves no text-side method to train: give a text plan with at least one rule "
                          "for the text tower (e.g. {tower: text, method: layernorm}), or use the heads alone "
                          "by passing a plan with a text lock rule.")
    name = f"{old.name if old is not None and old.name else 'model'}+text-swap"
    return TuningPlan(rules=[*vision, Rule(tower="vision", method="lock"), *text], name=name,
                      description="vision side kept frozen from the source model; text backbone swapped, "
                                  "text-side methods and text head trainable",
                      frozen_heads=["vision"])


def swap_text_tower(model: DualEncoder, text: str | TextConfig | dict[str, Any],
                    text_plan: TuningPlan | str | Path | None = None) -> DualEncoder:
    """A new model: `model`'s frozen vision side (tower, its tuned modules, vision head) and a new text tower."""
    if getattr(model, "growth", None):
        raise ConfigError(f"swap_text_tower does not carry growth yet: the model was grown by "
                          f"{[r['op'] for r in model.growth]}; swap before growing, then grow the swapped model.")
    if isinstance(text_plan, (str, Path)):
        text_plan = TuningPlan.from_recipe(text_plan)
    if isinstance(text, str):
        text = TextConfig(name=text)
    elif isinstance(text, dict):
        text = TextConfig.from_dict(text, where="swap_text_tower(text=...)")
    # The locked vision tower must not move: BatchNorm statistics stay frozen too.
    config = dataclasses.replace(model.config, text=text,
                                 vision=dataclasses.replace(model.config.vision, freeze_bn_stats=True))
    new = DualEncoder(ModelConfig.from_dict(config.to_dict(), where="swap_text_tower"))
    old_plan = model.plan_state.plan if model.plan_state is not None else None
    apply_plan(new, swap_plan(old_plan, text_plan))
    kept = {k: v for k, v in model.state_dict().items() if k.startswith(KEPT_PREFIXES)}
    expected = {k for k in new.state_dict() if k.startswith(KEPT_PREFIXES)}
    if set(kept) != expected:
        raise ConfigError(f"the vision side did not rebuild identically (differing keys: "
                          f"{sorted(set(kept) ^ expected)[:4]}); was the source model's plan changed after loading?")
    new.load_state_dict(kept, strict=False)
    with torch.no_grad():
        new.logit_scale.copy_(model.logit_scale)
    return new.to(model.device)
