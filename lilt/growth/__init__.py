"""Growth (GrowCLIP in lilt): deeper and wider trainable parts, a shared encoder, momentum inheritance.

- `lilt.growth.ops`: `GrowthOp`, `Inheritance`, `OP_GRAMMAR` - torch-free, so recipes are checked early;
- `lilt.growth.grower`: `grow`, `grow_`, `grow_depth`, `grow_width`, `add_shared_encoder`, `replay_growth`;
- `lilt.growth.widen`: widening helpers; `lilt.growth.optim`: `migrate_optimizer_state`.
The names below load on first use, so `import lilt.growth.ops` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GrowthOp": "ops", "Inheritance": "ops", "OP_GRAMMAR": "ops", "DEPTH_TOWERS": "ops", "WIDTH_TARGETS": "ops",
    "GrowthResult": "grower", "grow": "grower", "grow_": "grower", "grow_depth": "grower", "grow_width": "grower",
    "add_shared_encoder": "grower", "clone_model": "grower", "replay_growth": "grower",
    "Widening": "widen", "migrate_optimizer_state": "optim", "ADAM_MOMENTS": "optim",
    "SharedEncoder": "lilt.layers", "TokenBlock": "lilt.layers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        value = getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lilt.growth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
