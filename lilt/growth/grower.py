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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import Bottleneck, GatedBlock, SharedEncoder, TokenBlock, vit_block
from ..methods.deep import new_block
from ..towers.base import Tower
from .ops import GrowthOp, Inheritance
from .widen import Widening, grown_size, resized, unit_sources


@dataclass
class GrowthResult:
    """A grown model and what happened to the parameters: old -> new names, new names, widened tensors."""

    model: Any
    names: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    widened: dict[str, Widening] = field(default_factory=dict)
    op: GrowthOp | None = None


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
                block, fresh = vit_block(encoder.width, identity=True), vit_block(encoder.width)
                _mix_modules(block, fresh, self.inherit.momentum)
                encoder.blocks.append(block.to(encoder.modality.device, encoder.modality.dtype))
            self.touched += n
            return
        tower: Tower = getattr(self.model, op.target)
        tower.require_layout("depth growth")
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
            new = grown_size(old, factor)
            source = unit_sources(old, new)
            for name in ("vision_proj", "text_proj"):
                head = getattr(self.model, name)
                wide = resized(head, 0, new)  # keeps requires_grad: a frozen head (text-tower swap) stays frozen
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
        elif hasattr(inner, "ffn") and hasattr(inner.ffn, "lin1"):  # DistilBERT
            self._widen_pair(inner.ffn.lin1, inner.ffn.lin2, factor)
        elif hasattr(getattr(inner, "layer", [None])[-1], "DenseReluDense"):  # T5, and mT5's gated MLP
            ff = inner.layer[-1].DenseReluDense
            if hasattr(ff, "wi"):
                self._widen_pair(ff.wi, ff.wo, factor)
            else:  # act(wi_0 x) * wi_1 x: the gate's rows are copied with the units they gate
                self._widen_pair(ff.wi_0, ff.wo, factor, channelwise=[ff.wi_1])
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
        new = grown_size(old, factor)
        source = unit_sources(old, new)
        split = self.inherit.width_init == "split"
        wide_first = resized(first, 0, new)
        wide_second = resized(second, 1, new)
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
            wide = resized(module, 0, new)
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
