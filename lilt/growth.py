"""Growth: add trainable depth and width to a tuned DualEncoder as its data grows (after GrowCLIP).

GrowCLIP (Deng et al., ICCV 2023) trains on data that arrives in stages and grows the model at each
stage. In lilt the backbones stay frozen, so growth adds *trainable* capacity on top of them:

- `grow_depth`: new blocks of the tower's own kind (ViT/BERT block copies, inverted-residual blocks,
  or a light transformer block over a CNN's feature map), appended on top or interleaved;
- `grow_width`: wider adapter bottlenecks, higher LoRA ranks, wider MLPs in grown blocks, a wider
  embedding (projection heads) or wider MLPs in the shared encoder;
- `add_shared_encoder`: transformer blocks applied to both modalities' pooled features before the
  heads, weights shared across modalities, a learned modality embedding added (GrowCLIP's shared
  encoder).

Every op is *function-preserving* with exact inheritance: new blocks start as the identity (zeroed
output projections, a zero gate or BatchNorm scale), widened units are copies of existing ones whose
outgoing weights are split between the copies (Net2Net), new embedding dimensions and the shared
encoder's output start at zero. Parameter inheriting with momentum (PIM, `momentum` m) then sets every
new value to `m * inherited + (1 - m) * fresh`, where `fresh` is the value a newly built module would
have had: m = 1 keeps the function, m < 1 pushes the grown model away from the old minimum.

Ops are pure functions (`grow(model, op)` returns a grown copy whose frozen backbone tensors are shared
with the original, plus what moved where); `grow_(model, op)` grows in place (training uses it).
The checkpoint records each op, so `DualEncoder.from_pretrained` rebuilds the grown architecture.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .config import ConfigBase, ConfigError, knob
from .methods.adapter import Bottleneck
from .methods.deep import GatedBlock, _zero, new_block
from .towers.base import Tower

DEPTH_TOWERS = ("vision", "text", "shared")
WIDTH_TARGETS = ("adapter", "lora", "blocks", "heads", "shared")
OP_GRAMMAR = ("depth:TOWER:N[:top|interleave][:transformer] (TOWER: vision, text, shared); "
              "width:TARGET:FACTOR[:vision|text] (TARGET: adapter, lora, blocks, heads, shared); "
              "shared:DEPTH:WIDTH")


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
            if self.amount < 1 or self.amount != int(self.amount):
                raise ConfigError(f"depth growth adds a whole number >= 1 of blocks, not {self.amount}.")
        elif self.kind == "width":
            if self.target not in WIDTH_TARGETS:
                raise ConfigError(f"width growth target {self.target!r} is not one of {', '.join(WIDTH_TARGETS)}.")
            if self.amount <= 1:
                raise ConfigError(f"width growth factor {self.amount} must be > 1 (2 doubles the width).")
        elif self.amount < 1 or self.amount != int(self.amount) or self.width < 1:
            raise ConfigError(f"shared encoder depth={self.amount} and width={self.width} must be whole numbers >= 1.")

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
        except ValueError:
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


@dataclass
class Widening:
    """How a widened tensor maps onto its old self: along `dim`, new index j came from old index source[j]."""

    dim: int
    source: torch.Tensor  # LongTensor, len = new size
    old_size: int


@dataclass
class GrowthResult:
    """A grown model and what happened to the parameters: old -> new names, new names, widened tensors."""

    model: Any
    names: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    widened: dict[str, Widening] = field(default_factory=dict)
    op: GrowthOp | None = None


# -- the shared encoder ------------------------------------------------------------------------------
def _vit_block(width: int, mlp_ratio: float = 4.0) -> nn.Module:
    from timm.models.vision_transformer import Block

    heads = next(h for h in (8, 4, 2, 1) if width % h == 0 and (width // h >= 16 or h == 1))
    return Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True)


def _identity_vit_block(width: int, mlp_ratio: float = 4.0) -> nn.Module:
    block = _vit_block(width, mlp_ratio)
    _zero(block.attn.proj)
    _zero(block.mlp.fc2)
    return block


class SharedEncoder(nn.Module):
    """Transformer blocks shared by both modalities, on top of the towers' pooled features.

    Per modality: x -> in_proj(x) + modality embedding -> shared blocks -> norm -> out_proj, added back to x
    (a residual), so the heads keep their input width. out_proj starts at zero: adding the encoder leaves
    the model's function unchanged. Features enter as one token per example.
    """

    MODALITIES = ("vision", "text")

    def __init__(self, dims: dict[str, int], width: int, depth: int) -> None:
        super().__init__()
        self.width = width
        self.in_proj = nn.ModuleDict({m: nn.Linear(dims[m], width) for m in self.MODALITIES})
        self.modality = nn.Parameter(torch.zeros(len(self.MODALITIES), width))
        nn.init.trunc_normal_(self.modality, std=0.02)
        self.blocks = nn.ModuleList(_vit_block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.ModuleDict({m: nn.Linear(width, dims[m]) for m in self.MODALITIES})
        for proj in self.out_proj.values():
            _zero(proj)

    def forward(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        """features (B, D) or (B, T, D) of one modality -> the same shape, shared-encoded and added back."""
        tokens = features.unsqueeze(1) if features.dim() == 2 else features
        z = self.in_proj[modality](tokens) + self.modality[self.MODALITIES.index(modality)]
        for block in self.blocks:
            z = block(z)
        out = tokens + self.out_proj[modality](self.norm(z))
        return out.squeeze(1) if features.dim() == 2 else out


class TokenBlock(nn.Module):
    """A pre-LN transformer block over the H*W positions of a CNN feature map (B, C, H, W)."""

    def __init__(self, channels: int, identity: bool = True, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.block = _identity_vit_block(channels, mlp_ratio) if identity else _vit_block(channels, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), positions attending to each other."""
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


# -- public API ----------------------------------------------------------------------------------
def grow(model: Any, op: "GrowthOp | str | dict", inherit: Inheritance | None = None) -> GrowthResult:
    """A grown copy of `model` (frozen backbone tensors shared, not copied) and the name mapping.

    Fresh values (new blocks' weights, what momentum < 1 mixes in) come from torch's global RNG:
    seed it (torch.manual_seed) for a reproducible growth.
    """
    clone = clone_model(model)
    return grow_(clone, op, inherit)


def grow_depth(model: Any, tower: str, n: int = 1, where: str = "top", *, block: str = "own",
               inherit: Inheritance | None = None) -> GrowthResult:
    """Add n identity-initialized trainable blocks to a tower ('vision', 'text' or 'shared')."""
    return grow(model, GrowthOp("depth", tower, n, where=where, block=block), inherit)


def grow_width(model: Any, target: str, factor: float = 2, *, tower: str = "both",
               inherit: Inheritance | None = None) -> GrowthResult:
    """Widen adapter bottlenecks, LoRA ranks, grown blocks' MLPs, the embedding, or the shared encoder's MLPs."""
    return grow(model, GrowthOp("width", target, factor, tower=tower), inherit)


def add_shared_encoder(model: Any, depth: int = 1, width: int = 256, *,
                       inherit: Inheritance | None = None) -> GrowthResult:
    """Add a shared transformer encoder over both modalities' pooled features (output zero-initialized)."""
    return grow(model, GrowthOp("shared", "shared", depth, width=width), inherit)


def clone_model(model: Any) -> Any:
    """A deep copy of a DualEncoder that shares (does not copy) its frozen parameters."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo)


def grow_(model: Any, op: "GrowthOp | str | dict", inherit: Inheritance | None = None) -> GrowthResult:
    """Grow `model` in place; returns it with the name mapping (identity for kept names) and widenings."""
    op = GrowthOp.parse(op)
    inherit = inherit or Inheritance()
    before = {n for n, _ in model.named_parameters()}
    grower = _Grower(model, inherit)
    record: dict[str, Any] = {"op": op.spec()}
    with torch.no_grad():
        if op.kind == "depth":
            grower.depth(op)
        elif op.kind == "width":
            record["sizes"] = grower.width(op)
        else:
            grower.shared(op)
    if not grower.touched:
        raise ConfigError(f"growth op {op.spec()!r} found nothing to grow: {grower.nothing_hint(op)}")
    record["momentum"] = inherit.momentum
    record["width_init"] = inherit.width_init
    model.growth.append(record)
    after = dict(model.named_parameters())
    state = model.plan_state
    index = len(model.growth) - 1
    added = [n for n in after if n not in before]
    for name in added:
        after[name].requires_grad_(True)
        if state is not None:
            state.grown[name] = index
    return GrowthResult(model, {n: n for n in before if n in after}, added, grower.widened, op)


def replay_growth(model: Any, history: list[dict[str, Any]]) -> None:
    """Re-apply a checkpoint's growth history so its saved tensors fit (values come from the checkpoint)."""
    heads = [r["sizes"]["heads"] for r in history if r.get("sizes", {}).get("heads")]
    # A checkpoint's config holds its final embed_dim, so from_pretrained builds the heads at the grown
    # width already; a run resumed from a recipe builds them at the starting width and must widen them.
    built_wide = bool(heads) and model.vision_proj.out_features == heads[-1]
    for record in history:
        op = GrowthOp.parse(record["op"])
        if op.kind == "width" and op.target == "heads" and built_wide:
            model.growth.append(dict(record))
            continue
        grow_(model, op, Inheritance(width_init=record.get("width_init", "split")))
        model.growth[-1] = dict(record)


# -- the machinery -----------------------------------------------------------------------------------
def _clean_copy(block: nn.Module) -> nn.Module:
    """A copy of a block without modules other rules added: LoRA/IA3 merged into the weights, adapters dropped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    block = copy.deepcopy(block)
    for name, module in list(block.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=list(module.active_adapters))
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, module.get_base_layer())
    for module in block.modules():
        if hasattr(module, "lilt_adapter"):
            del module.lilt_adapter
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
    return block


def _mix(inherited: torch.Tensor, fresh: torch.Tensor, m: float, mask: torch.Tensor | None = None) -> None:
    """In place: inherited <- m * inherited + (1 - m) * fresh (on `mask` only, when given)."""
    if m == 1.0:
        return
    mixed = m * inherited + (1.0 - m) * fresh.to(inherited.dtype)
    inherited.copy_(mixed if mask is None else torch.where(mask, mixed, inherited))


def _mix_modules(inherited: nn.Module, fresh: nn.Module, m: float) -> None:
    fresh_params = dict(fresh.named_parameters())
    for name, p in inherited.named_parameters():
        _mix(p.data, fresh_params[name].data, m)


class _Grower:
    """Applies one op to a model in place, collecting what it added or widened."""

    def __init__(self, model: Any, inherit: Inheritance) -> None:
        self.model, self.inherit = model, inherit
        self.touched = 0
        self.widened: dict[str, Widening] = {}
        self.names = {id(m): n for n, m in model.named_modules()}

    def _towers(self, which: str) -> list[tuple[str, Tower]]:
        names = ["vision", "text"] if which == "both" else [which]
        return [(n, getattr(self.model, n)) for n in names]

    # -- depth -------------------------------------------------------------------------------------
    def depth(self, op: GrowthOp) -> None:
        n = int(op.amount)
        if op.target == "shared":
            encoder = self.model.shared_encoder
            if encoder is None:
                raise ConfigError("depth:shared needs a shared encoder; add one first with shared:DEPTH:WIDTH.")
            for _ in range(n):
                block, fresh = _identity_vit_block(encoder.width), _vit_block(encoder.width)
                _mix_modules(block, fresh, self.inherit.momentum)
                encoder.blocks.append(block.to(encoder.modality.device, encoder.modality.dtype))
            self.touched += n
            return
        tower: Tower = getattr(self.model, op.target)
        if tower.block_kind not in ("prenorm", "postnorm", "cnn"):
            raise ConfigError(f"depth growth: the {op.target} tower's blocks are of kind {tower.block_kind!r}; "
                              "lilt grows prenorm (ViT), postnorm (BERT) and CNN towers.")
        if op.block == "transformer" and tower.block_kind != "cnn":
            raise ConfigError("depth growth block='transformer' is for CNN towers; transformer towers grow their "
                              "own block type.")
        backbone = list(tower.backbone_blocks())
        if op.where == "top":
            last = tower.blocks()[-1]
            last = last.block if isinstance(last, GatedBlock) else last  # copy BERT layers, not their gates
            source = _clean_copy(last) if tower.block_kind != "cnn" else last
            channels = tower.block_channels(tower.num_blocks - 1)
            for _ in range(n):
                tower.extra_blocks.append(self._new_block(tower, source, channels, op.block))
        else:
            if not tower.can_split:
                raise ConfigError(f"interleaved growth needs a {op.target} tower whose blocks run one by one.")
            count = len(backbone)
            for k in range(n):
                after = max(0, (k + 1) * count // (n + 1) - 1)
                source = _clean_copy(backbone[after]) if tower.block_kind != "cnn" else backbone[after]
                block = self._new_block(tower, source, tower.block_channels(after), op.block)
                key = str(after)
                if key not in tower.inserted_blocks:
                    tower.inserted_blocks[key] = nn.ModuleList()
                tower.inserted_blocks[key].append(block)
        self.touched += n

    def _new_block(self, tower: Tower, source: nn.Module, channels: int, kind: str) -> nn.Module:
        m = self.inherit.momentum
        if kind == "transformer":
            block = TokenBlock(channels)
            fresh = TokenBlock(channels, identity=False)
        else:
            block = new_block(tower, source, "copy", identity=True, channels=channels)
            if tower.block_kind == "cnn":  # nothing to inherit but the zero scale: same draw, scale 1
                fresh = copy.deepcopy(block)
                nn.init.ones_(fresh.bn3.weight)
            else:
                fresh = new_block(tower, source, "random", identity=False)
        _mix_modules(block, fresh, m)
        reference = next(source.parameters())
        block.to(device=reference.device, dtype=reference.dtype)
        if getattr(tower, "channels_last", False):
            block.to(memory_format=torch.channels_last)
        return block.requires_grad_(True)

    # -- width -------------------------------------------------------------------------------------
    def width(self, op: GrowthOp) -> dict[str, int]:
        factor = op.amount
        sizes: dict[str, int] = {}
        if op.target == "heads":
            old = self.model.vision_proj.out_features
            new = _grown(old, factor)
            source = _sources(old, new)
            for name in ("vision_proj", "text_proj"):
                head = getattr(self.model, name)
                wide = _resized(head, 0, new)  # keeps requires_grad: a frozen head (text-tower swap) stays frozen
                for pname in ("weight", "bias"):
                    if getattr(head, pname, None) is not None:
                        self._widen_tensor(head, wide, pname, 0, source, inherited_new="zero")
                        self._record(f"{name}.{pname}", 0, source, old)
                self._replace(head, wide)
            self.model.config.embed_dim = new
            self.touched += 1
            return {"heads": new}
        if op.target == "shared":
            encoder = self.model.shared_encoder
            if encoder is None:
                raise ConfigError("width:shared needs a shared encoder; add one first with shared:DEPTH:WIDTH.")
            for block in encoder.blocks:
                self._widen_pair(block.mlp.fc1, block.mlp.fc2, factor)
            return sizes
        for _, tower in self._towers(op.tower):
            if op.target == "adapter":
                for module in tower.modules():
                    adapter = getattr(module, "lilt_adapter", None)
                    if isinstance(adapter, Bottleneck):
                        self._widen_pair(adapter.down, adapter.up, factor)
            elif op.target == "lora":
                self._widen_lora(tower, factor)
            else:
                for block in [*tower.extra_blocks, *(b for blocks in tower.inserted_blocks.values() for b in blocks)]:
                    self._widen_block(block, factor)
        return sizes

    def _widen_block(self, block: nn.Module, factor: float) -> None:
        inner = block.block if isinstance(block, (GatedBlock, TokenBlock)) else block
        if hasattr(inner, "mlp") and hasattr(inner.mlp, "fc1"):
            self._widen_pair(inner.mlp.fc1, inner.mlp.fc2, factor)
        elif hasattr(inner, "intermediate") and hasattr(inner, "output"):
            self._widen_pair(inner.intermediate.dense, inner.output.dense, factor)
        elif hasattr(inner, "conv_pw") and hasattr(inner, "conv_pwl"):
            if not isinstance(getattr(inner, "se", nn.Identity()), nn.Identity):
                raise ConfigError("width growth of inverted-residual blocks with squeeze-excitation is not supported.")
            self._widen_pair(inner.conv_pw, inner.conv_pwl, factor, channelwise=[inner.bn1, inner.conv_dw, inner.bn2])
        else:
            raise ConfigError(f"width growth does not know the MLP of a {type(inner).__name__} block.")

    def _widen_lora(self, tower: Tower, factor: float) -> None:
        from peft.tuners.lora import LoraLayer

        for module in tower.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in list(module.lora_A.keys()):
                if not name.startswith("lilt_"):
                    continue
                r = module.r[name]
                self._widen_pair(module.lora_A[name], module.lora_B[name], factor)
                new_r = module.lora_A[name].weight.shape[0]
                # peft scales the update by alpha / r: raise alpha with r so the scaling, and the function, stay.
                module.lora_alpha[name] = module.lora_alpha[name] * new_r / r
                module.r[name] = new_r

    def _widen_pair(self, first: nn.Module, second: nn.Module, factor: float,
                    channelwise: list[nn.Module] | None = None) -> None:
        """Widen the units between `first` (their inputs, dim 0) and `second` (their outputs, dim 1)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in (first, second, *(channelwise or [])):
            if isinstance(module, BaseTunerLayer):
                raise ConfigError(f"width growth cannot widen {self.names[id(module)]}: a lora/ia3 rule wraps it. "
                                  "Keep peft rules off the blocks you widen (e.g. layers='bottom:K', or a glob).")
        old = first.weight.shape[0]
        new = _grown(old, factor)
        source = _sources(old, new)
        split = self.inherit.width_init == "split"
        wide_first = _resized(first, 0, new)
        wide_second = _resized(second, 1, new)
        self._widen_tensor(first, wide_first, "weight", 0, source, "copy" if split else "fresh")
        if getattr(first, "bias", None) is not None:
            self._widen_tensor(first, wide_first, "bias", 0, source, "copy" if split else "fresh")
        self._widen_tensor(second, wide_second, "weight", 1, source, "split" if split else "zero")
        if getattr(second, "bias", None) is not None:
            wide_second.bias.data.copy_(second.bias.data)
        names = [self.names[id(first)], self.names[id(second)]]
        widened = [(first, wide_first, names[0], 0, ("weight", "bias")),
                   (second, wide_second, names[1], 1, ("weight",))]
        for module in channelwise or []:
            wide = _resized(module, 0, new)
            for pname, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                value = getattr(module, pname)
                if value.dim() == 0:
                    getattr(wide, pname).copy_(value)
                else:
                    self._widen_tensor(module, wide, pname, 0, source, "copy")
            widened.append((module, wide, self.names[id(module)], 0, ("weight", "bias")))
        for old_module, wide, name, dim, pnames in widened:
            self._replace(old_module, wide)
            for pname in pnames:
                if getattr(wide, pname, None) is not None:
                    self._record(f"{name}.{pname}", dim, source, old)
        self.touched += 1

    def _widen_tensor(self, old_module: nn.Module, wide: nn.Module, name: str, dim: int, source: torch.Tensor,
                      inherited_new: str) -> None:
        """Fill wide.<name> from old_module.<name> along dim; new slices per `inherited_new`, then PIM."""
        old_value = getattr(old_module, name).data
        target = getattr(wide, name).data
        fresh = target.clone()  # the wide module's own initialization of the new slices
        old_size = old_value.shape[dim]
        inherited = old_value.index_select(dim, source.to(old_value.device))
        new_mask_1d = torch.arange(len(source), device=target.device) >= old_size
        shape = [1] * target.dim()
        shape[dim] = len(source)
        new_mask = new_mask_1d.view(shape).expand_as(target)
        if inherited_new == "split":
            counts = torch.bincount(source, minlength=old_size).to(target.dtype)
            inherited = inherited / counts[source].to(inherited.device).view(shape)
        elif inherited_new == "zero":
            inherited = torch.where(new_mask, torch.zeros_like(inherited), inherited)
        elif inherited_new == "fresh":
            inherited = torch.where(new_mask, fresh, inherited)
        target.copy_(inherited)
        _mix(target, fresh, self.inherit.momentum, new_mask)

    def _replace(self, old: nn.Module, new: nn.Module) -> None:
        name = self.names[id(old)]
        if hasattr(old, "lilt_adapter"):  # an adapter rule hooked this module: the wide one keeps its adapter
            new.lilt_adapter = old.lilt_adapter
            new._forward_hooks.update(old._forward_hooks)
            new._forward_hooks_with_kwargs.update(old._forward_hooks_with_kwargs)
            new._forward_pre_hooks.update(old._forward_pre_hooks)
            new._forward_pre_hooks_with_kwargs.update(old._forward_pre_hooks_with_kwargs)
        parent, _, child = name.rpartition(".")
        holder = self.model.get_submodule(parent) if parent else self.model
        if isinstance(holder, nn.ModuleDict):
            holder[child] = new
        else:
            setattr(holder, child, new)
        self.names[id(new)] = name

    def _record(self, name: str, dim: int, source: torch.Tensor, old: int) -> None:
        self.widened[name] = Widening(dim, source.clone(), old)

    # -- shared encoder -------------------------------------------------------------------------------
    def shared(self, op: GrowthOp) -> None:
        if self.model.shared_encoder is not None:
            raise ConfigError("the model already has a shared encoder; grow it with depth:shared:N or "
                              "width:shared:FACTOR.")
        dims = {"vision": self.model.vision.hidden_size, "text": self.model.text.hidden_size}
        encoder = SharedEncoder(dims, op.width, int(op.amount))
        fresh = copy.deepcopy(encoder)
        for proj in fresh.out_proj.values():
            proj.reset_parameters()
        _mix_modules(encoder, fresh, self.inherit.momentum)
        self.model.shared_encoder = encoder.to(self.model.device, self.model.vision_proj.weight.dtype)
        self.touched += 1

    def nothing_hint(self, op: GrowthOp) -> str:
        return {"adapter": "the plan has no adapter rule", "lora": "the plan has no lora rule",
                "blocks": "no grown or appended (deep) blocks to widen; grow depth first"}.get(
            op.target, "nothing matched")


def _grown(old: int, factor: float) -> int:
    new = int(math.ceil(old * factor))
    if new <= old:
        raise ConfigError(f"width factor {factor} does not widen {old} units.")
    return new


def _sources(old: int, new: int) -> torch.Tensor:
    # New unit j copies old unit (j - old) mod old: every old unit is copied as evenly as possible.
    return torch.cat([torch.arange(old), torch.arange(new - old) % old])


def _resized(module: nn.Module, dim: int, size: int) -> nn.Module:
    """A fresh module like `module` with `size` units along dim (0: outputs, 1: inputs)."""
    ref = module.weight
    if isinstance(module, nn.Linear):
        i, o = module.in_features, module.out_features
        wide = nn.Linear(size if dim == 1 else i, size if dim == 0 else o, bias=module.bias is not None)
    elif isinstance(module, nn.Conv2d):
        grouped = module.groups == module.in_channels == module.out_channels and module.groups > 1
        i, o = module.in_channels, module.out_channels
        i, o = (size, size) if grouped else (size if dim == 1 else i, size if dim == 0 else o)
        wide = nn.Conv2d(i, o, module.kernel_size, module.stride, module.padding, module.dilation,
                         groups=size if grouped else module.groups, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        wide = copy.deepcopy(module)
        wide.num_features = size
        for pname in ("weight", "bias"):
            if getattr(module, pname, None) is not None:
                setattr(wide, pname, nn.Parameter(torch.ones(size) if pname == "weight" else torch.zeros(size)))
        for bname in ("running_mean", "running_var"):
            if getattr(module, bname, None) is not None:
                wide.register_buffer(bname, torch.zeros(size) if bname == "running_mean" else torch.ones(size))
    else:
        raise ConfigError(f"width growth cannot widen a {type(module).__name__}.")
    wide = wide.to(device=ref.device, dtype=ref.dtype)
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        wide = wide.to(memory_format=torch.channels_last)
    wide.requires_grad_(module.weight.requires_grad)
    return wide


# -- optimizer state across growth -------------------------------------------------------------------
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def migrate_optimizer_state(old: torch.optim.Optimizer, old_names: dict[nn.Parameter, str],
                            new: torch.optim.Optimizer, new_model: nn.Module,
                            widened: dict[str, Widening] | None = None, mode: str = "migrate") -> int:
    """Carry Adam state from `old` (params named by `old_names`) into `new` over the grown model's params.

    Kept tensors keep their moments and step count. A widened tensor keeps its old slices; its new slices
    start at zero (`mode='migrate'`) or with the moments of the units they copy (`mode='copy'`). Brand-new
    tensors have no state, so AdamW starts them from scratch. Returns how many tensors carried state.
    """
    widened = widened or {}
    by_name = {old_names[p]: state for p, state in old.state.items() if p in old_names and state}
    carried = 0
    for name, param in new_model.named_parameters():
        state = by_name.get(name)
        if state is None or not param.requires_grad:
            continue
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0 or key not in ADAM_MOMENTS:
                moved[key] = value.clone() if torch.is_tensor(value) else value
                continue
            if name in widened and value.shape != param.shape:
                w = widened[name]
                grown = value.index_select(w.dim, w.source.to(value.device))
                if mode != "copy":
                    keep = (torch.arange(len(w.source), device=value.device) < w.old_size)
                    shape = [1] * grown.dim()
                    shape[w.dim] = len(w.source)
                    grown = grown * keep.view(shape).to(grown.dtype)
                value = grown
            if value.shape != param.shape:
                raise RuntimeError(f"internal error: optimizer state {key} of {name} has shape "
                                   f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
            moved[key] = value.clone()
        new.state[param] = moved
        carried += 1
    return carried
