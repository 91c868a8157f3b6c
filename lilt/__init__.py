"""lilt: parameter-efficient contrastive alignment of frozen vision and language backbones.

    import lilt
    model = lilt.DualEncoder.from_backbones("packaged:efficientnet-lite0", "packaged:multilingual-e5-small")
    lilt.apply_plan(model, "recipes/methods/lwa.yaml")
    print(lilt.budget(model))
    model.save_pretrained("out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each. Loaded on first use, so `import lilt` (and the CLI's
# --help) does not pay for importing torch, timm, transformers and peft.
_EXPORTS = {
    "DualEncoder": "lilt.model",
    "DualEncoderOutput": "lilt.model",
    "BackboneMismatchError": "lilt.model",
    "TuningPlan": "lilt.plan",
    "Rule": "lilt.plan",
    "RuleMatchError": "lilt.plan",
    "apply_plan": "lilt.plan",
    "budget": "lilt.plan",
    "Budget": "lilt.plan",
    "ModelConfig": "lilt.config",
    "VisionConfig": "lilt.config",
    "TextConfig": "lilt.config",
    "ConfigError": "lilt.config",
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
