"""lilt: parameter-efficient contrastive alignment of frozen vision and language backbones.

    import lilt
    model = lilt.DualEncoder.from_backbones("packaged:efficientnet-lite0", "packaged:multilingual-e5-small")
    lilt.apply_plan(model, "lwa")  # a built-in recipe (`lilt recipes`), or a YAML file
    print(lilt.budget(model))
    lilt.train(model, "builtin:emoji-cldr", lilt.TrainConfig(steps=200, batch_size=32))
    print(lilt.evaluate_retrieval(model, lilt.load_pairs("builtin:emoji-cldr:test", langs=["en", "sw"])))
    model.save_pretrained("out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each, loaded on first use, so `import lilt` (and the CLI's
# --help) does not pay for importing torch, timm, transformers and peft. The loop lives in
# lilt/training.py, not lilt/train.py as DESIGN.md sketched: a submodule named `train` would replace
# the `lilt.train(...)` function as soon as anything imported it.
_EXPORTS = {
    "DualEncoder": "lilt.model",
    "DualEncoderOutput": "lilt.model",
    "LiltError": "lilt.errors",
    "CheckpointError": "lilt.errors",
    "NonFiniteError": "lilt.errors",
    "HubError": "lilt.errors",
    "BackboneMismatchError": "lilt.errors",
    "Recipe": "lilt.recipe",
    "TuningPlan": "lilt.recipe",
    "Rule": "lilt.recipe",
    "RuleMatchError": "lilt.plan",
    "apply_plan": "lilt.plan",
    "budget": "lilt.plan",
    "Budget": "lilt.plan",
    "ModelConfig": "lilt.config",
    "VisionConfig": "lilt.config",
    "TextConfig": "lilt.config",
    "ConfigError": "lilt.errors",
    "DataConfig": "lilt.config",
    "CurateConfig": "lilt.config",
    "curate": "lilt.curation",
    "TrainConfig": "lilt.config",
    "DataError": "lilt.errors",
    "train": "lilt.training",
    "TrainResult": "lilt.training",
    "load_pairs": "lilt.data",
    "load_labelled": "lilt.data",
    "evaluate_retrieval": "lilt.eval",
    "evaluate_zeroshot": "lilt.eval",
    "linear_probe": "lilt.eval",
    "HubnessBank": "lilt.eval",
    "choose_hubness": "lilt.eval",
    "RidgeEnsemble": "lilt.eval.ensemble",
    "fit_ridge_ensemble": "lilt.eval.ensemble",
    "swap_text_tower": "lilt.swap",
    "grow": "lilt.growth",
    "grow_depth": "lilt.growth",
    "grow_width": "lilt.growth",
    "add_shared_encoder": "lilt.growth",
    "GrowthOp": "lilt.growth",
    "Inheritance": "lilt.growth",
    "GrowthStage": "lilt.config",
    "export_embeddings": "lilt.embeddings",
    "search": "lilt.embeddings",
    "search_index": "lilt.embeddings",
    "open_index": "lilt.embeddings",
    "RidgeMap": "lilt.baselines",
    "KernelRidgeMap": "lilt.baselines",
    "fit_ridge": "lilt.baselines",
    "heads_from_ridge": "lilt.baselines",
    "trainable_state": "lilt.interpolation",
    "interpolate": "lilt.interpolation",
    "interpolated": "lilt.interpolation",
    "choose_alpha": "lilt.interpolation",
    "VisionTower": "lilt.towers.vision",
    "TextTower": "lilt.towers.text",
    "METHODS": "lilt.methods",
    "register_method": "lilt.methods",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lilt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
