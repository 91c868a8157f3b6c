"""Growth ops as data: `GrowthOp` (the compact spelling 'depth:text:1' and its fields) and `Inheritance`.

Torch-free, so a recipe's growth stages are checked (`lilt.config.GrowthStage`) before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configbase import ConfigBase, knob
from ..errors import ConfigError

DEPTH_TOWERS = ("vision", "text", "shared")
WIDTH_TARGETS = ("adapter", "lora", "blocks", "heads", "shared")
OP_GRAMMAR = ("depth:TOWER:N[:top|interleave][:transformer] (TOWER: vision, text, shared); "
              "width:TARGET:FACTOR[:vision|text] (TARGET: adapter, lora, blocks, heads, shared); "
              "shared:DEPTH:WIDTH")
# Bounds that keep a typo (depth:text:100000) from building a model that never finishes building.
MAX_BLOCKS = 64
MAX_FACTOR = 16.0
MAX_WIDTH = 8192


@dataclass
class GrowthOp(ConfigBase):
    """One growth operation; `GrowthOp.parse('depth:text:1')` reads the compact spelling."""

    kind: Literal["depth", "width", "shared"] = knob(help="what grows: depth, width, or a new shared encoder")
    target: str = knob("", "depth: vision|text|shared; width: adapter|lora|blocks|heads|shared")
    amount: float = knob(1, "depth: blocks to add; width: factor (> 1); shared: number of blocks")
    where: Literal["top", "interleave"] = knob("top", "depth: append on top, or spread between backbone blocks")
    block: Literal["own", "transformer"] = knob(
        "own", "depth on a CNN tower: its own inverted-residual block, or a light transformer block over the "
        "feature map's positions")
    tower: Literal["both", "vision", "text"] = knob("both", "width of adapter/lora/blocks: which towers")
    width: int = knob(256, "shared: the shared encoder's width")

    def validate(self) -> None:
        if self.kind == "depth":
            if self.target not in DEPTH_TOWERS:
                raise ConfigError(f"depth growth target {self.target!r} is not one of {', '.join(DEPTH_TOWERS)}.")
            if not 1 <= self.amount <= MAX_BLOCKS or self.amount != int(self.amount):
                raise ConfigError(f"depth growth adds a whole number of blocks in [1, {MAX_BLOCKS}], not "
                                  f"{self.amount}.")
        elif self.kind == "width":
            if self.target not in WIDTH_TARGETS:
                raise ConfigError(f"width growth target {self.target!r} is not one of {', '.join(WIDTH_TARGETS)}.")
            if not 1 < self.amount <= MAX_FACTOR:
                raise ConfigError(f"width growth factor {self.amount} must be in (1, {MAX_FACTOR:g}] (2 doubles the "
                                  "width).")
        elif not 1 <= self.amount <= MAX_BLOCKS or self.amount != int(self.amount) or not 1 <= self.width <= MAX_WIDTH:
            raise ConfigError(f"shared encoder depth={self.amount} and width={self.width} must be whole numbers in "
                              f"[1, {MAX_BLOCKS}] and [1, {MAX_WIDTH}].")

    @classmethod
    def parse(cls, spec: "str | GrowthOp | dict") -> "GrowthOp":
        """Read 'depth:text:1', 'depth:vision:2:interleave', 'width:adapter:2', 'shared:1:256' (or a dict)."""
        if isinstance(spec, GrowthOp):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec, where="growth op")
        parts = str(spec).split(":")
        try:
            if parts[0] == "depth" and 3 <= len(parts) <= 5:
                extra = parts[3:]
                where = next((p for p in extra if p in ("top", "interleave")), "top")
                block = next((p for p in extra if p in ("own", "transformer")), "own")
                if len(extra) != sum(p in ("top", "interleave", "own", "transformer") for p in extra):
                    raise ValueError
                return cls("depth", parts[1], int(parts[2]), where=where, block=block)
            if parts[0] == "width" and len(parts) in (3, 4):
                return cls("width", parts[1], float(parts[2]), tower=parts[3] if len(parts) == 4 else "both")
            if parts[0] == "shared" and len(parts) == 3:
                return cls("shared", "shared", int(parts[1]), width=int(parts[2]))
        except ConfigError as err:  # understood, but out of range: say which op
            raise ConfigError(f"growth op {spec!r}: {err} Spell ops {OP_GRAMMAR}.") from None
        except (ValueError, OverflowError):
            pass
        raise ConfigError(f"growth op {spec!r} is not understood. Spell it {OP_GRAMMAR}.")

    @property
    def part(self) -> str:
        """The part of the model the op grows: vision, text, both, heads or shared (for budgets)."""
        if self.kind == "shared" or self.target == "shared":
            return "shared"
        if self.kind == "depth":
            return self.target
        return "heads" if self.target == "heads" else self.tower

    def spec(self) -> str:
        """The compact spelling (inverse of `parse`)."""
        if self.kind == "depth":
            extra = (":interleave" if self.where == "interleave" else "") + (
                ":transformer" if self.block == "transformer" else "")
            return f"depth:{self.target}:{int(self.amount)}{extra}"
        if self.kind == "width":
            factor = int(self.amount) if self.amount == int(self.amount) else self.amount
            return f"width:{self.target}:{factor}" + (f":{self.tower}" if self.tower != "both" else "")
        return f"shared:{int(self.amount)}:{self.width}"


@dataclass
class Inheritance(ConfigBase):
    """How new parameters start: momentum m in [0, 1] between the inherited and a fresh value (PIM)."""

    momentum: float = knob(1.0, "m: new = m * inherited + (1 - m) * fresh (1: the grown model computes the same)")
    width_init: Literal["split", "zero"] = knob(
        "split", "widened units: copies of existing units with split outgoing weights (Net2Net), or fresh inputs "
        "with zero outgoing weights; both keep the function. Copies stay copies under m = 1 (equal gradients)")

    def validate(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"inherit momentum {self.momentum} must be in [0, 1].")
