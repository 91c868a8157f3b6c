"""What every tower shares: stem -> blocks -> finish, a frozen prefix run without autograd, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .._io import sha256_file
from ..errors import ConfigError


@dataclass(frozen=True)
class BlockLayout:
    """Where the parts of one block of a backbone family sit (module paths relative to the block).

    Block-level methods (adapter, unlock what=..., deep, depth growth, peft defaults) read this
    instead of knowing each family; a family without a layout gets whole-tower methods only.
    """

    # How adapters hook in and how a new block starts as the identity: prenorm, postnorm or cnn.
    kind: str
    serial: dict[str, str]                                   # adapter site -> module a serial adapter wraps
    parallel: dict[str, str] = field(default_factory=dict)   # adapter site -> sublayer (empty: no parallel)
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # unlock what= -> parameter name prefixes
    residual_ends: tuple[str, ...] = ()  # prenorm: output projections zeroed so a copied block is the identity
    lora: tuple[str, ...] = ()           # default LoRA targets (module globs)
    ia3: tuple[str, ...] = ()            # default IA3 targets; the last one is the feed-forward one
    # A listed block that holds several repeated units (a Swin stage: its `blocks`); adapters go in each unit.
    units: str = ""


_VIT_PARTS = {"attention": ("norm1.", "attn.", "ls1."), "mlp": ("norm2.", "mlp.", "ls2.")}
LAYOUTS: dict[str, BlockLayout] = {
    "vit": BlockLayout("prenorm", {"attention": "norm1", "mlp": "norm2"}, {"attention": "attn", "mlp": "mlp"},
                       _VIT_PARTS, ("attn.proj", "mlp.fc2"), ("attn.qkv", "attn.proj"), ("attn.qkv", "mlp.fc2")),
    "swin": BlockLayout("prenorm", {"attention": "norm1", "mlp": "norm2"}, {"attention": "attn", "mlp": "mlp"},
                        _VIT_PARTS, ("attn.proj", "mlp.fc2"), ("blocks.*.attn.qkv", "blocks.*.attn.proj"),
                        ("blocks.*.attn.qkv", "blocks.*.mlp.fc2"), units="blocks"),
    "bert": BlockLayout("postnorm", {"attention": "attention.output.dense", "mlp": "output.dense"},
                        {"attention": "attention.output", "mlp": "output"},
                        {"attention": ("attention.",), "mlp": ("intermediate.", "output.")}, (),
                        ("attention.self.query", "attention.self.value"),
                        ("attention.self.key", "attention.self.value", "output.dense")),
    "distilbert": BlockLayout("postnorm", {"attention": "attention.out_lin", "mlp": "ffn.lin2"}, {},
                              {"attention": ("attention.", "sa_layer_norm."), "mlp": ("ffn.", "output_layer_norm.")},
                              (), ("attention.q_lin", "attention.v_lin"),
                              ("attention.k_lin", "attention.v_lin", "ffn.lin2")),
    "mpnet": BlockLayout("postnorm", {"attention": "attention.attn.o", "mlp": "output.dense"}, {},
                         {"attention": ("attention.",), "mlp": ("intermediate.", "output.")}, (),
                         ("attention.attn.q", "attention.attn.v"), ("attention.attn.k", "attention.attn.v",
                                                                    "output.dense")),
    "t5": BlockLayout("prenorm", {"attention": "layer.0.layer_norm", "mlp": "layer.1.layer_norm"}, {},
                      {"attention": ("layer.0.",), "mlp": ("layer.1.",)},
                      ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo"),
                      ("layer.0.SelfAttention.q", "layer.0.SelfAttention.v"),
                      ("layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.1.DenseReluDense.wo")),
    # CNN stages: one adapter after each stage; new blocks are inverted residuals.
    "efficientnet": BlockLayout("cnn", {"stage": ""}, lora=("*conv_pw", "*conv_pwl"), ia3=("*conv_pwl",)),
    "resnet": BlockLayout("cnn", {"stage": ""}, lora=("*conv1", "*conv2"), ia3=("*conv2",)),
    "convnext": BlockLayout("cnn", {"stage": ""}, lora=("*mlp.fc1", "*mlp.fc2"), ia3=("*mlp.fc2",)),
}
SUPPORTED = {"vision": "timm ViT, Swin, ResNet, ConvNeXt, EfficientNet/MobileNetV3",
             "text": "BERT, RoBERTa/XLM-R, DistilBERT, MPNet, T5/mT5 encoders"}


def weights_sha256(folder: Path | None) -> str | None:
    """sha256 of a backbone folder's safetensors weights, read before anything is built from it (None: no folder)."""
    if folder is None:
        return None
    recorded = folder / "lilt_packaged.json"  # a packaged conversion records (and verifies) its weights' hash
    if recorded.is_file():
        return json.loads(recorded.read_text()).get("sha256")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest() if files else None


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # Viewing as bytes hashes bf16/fp16 exactly and avoids a float copy.
        flat = tensor.reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


class Tower(nn.Module):
    """A backbone seen as stem -> blocks -> finish, plus blocks appended by the `deep` method.

    Subclasses say where the stem, the blocks and the finish are. The forward pass runs the
    longest frozen prefix (stem and leading blocks without a trainable parameter) under
    `torch.no_grad`, so a mostly frozen tower stores no activations for its frozen part.
    """

    kind: ClassVar[str] = ""
    # The backbone family (vit, swin, resnet, ..., bert, t5, or generic) and, when block-level methods
    # support it, where the parts of its blocks sit.
    family: str = "generic"
    layout: BlockLayout | None = None
    hidden_size: int = 0
    # Whether stem, blocks and finish can run separately; if not, only appended blocks run apart.
    can_split: bool = True
    # train.gradient_checkpointing: blocks after the frozen prefix keep only their input for the backward
    # pass and run again there (torch.utils.checkpoint), trading one more forward for their activations.
    gradient_checkpointing: bool = False

    def __init__(self, backbone: nn.Module, source: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.extra_blocks = nn.ModuleList()
        # Blocks added between backbone blocks by depth growth: key str(i) runs after backbone block i.
        self.inserted_blocks = nn.ModuleDict()
        self.source = source
        self.weights_sha256: str | None = None  # of the folder's weights files, when built from a folder
        state = backbone.state_dict()
        # Hash the pretrained weights now, before any rule or training can touch them.
        self.backbone_sha256 = state_dict_sha256(state)
        self.pristine_keys = frozenset(state)

    @property
    def block_kind(self) -> str:
        """How blocks are built: "prenorm" (ViT, Swin, T5), "postnorm" (BERT-likes), "cnn" (stages) or "generic"."""
        return self.layout.kind if self.layout is not None else "generic"

    def require_layout(self, what: str) -> BlockLayout:
        """The block layout, or a one-line error naming the backbone and the families that have one."""
        if self.layout is None:
            raise ConfigError(
                f"{what} needs block-level access, which lilt does not have for the {self.kind} backbone "
                f"{self.source!r} ({type(self.backbone).__name__}); supported {self.kind} families: "
                f"{SUPPORTED[self.kind]}. Whole-tower methods (layernorm, bitfit, lock, unlock layers=all, "
                "lora with target_modules) work on any backbone.")
        return self.layout

    def units(self, index: int) -> list[nn.Module]:
        """The repeated units inside block `index` (a Swin stage's transformer blocks; else the block itself)."""
        block = self.blocks()[index]
        inner = getattr(block, self.layout.units, None) if self.layout is not None and self.layout.units else None
        return list(inner) if isinstance(inner, (nn.Sequential, nn.ModuleList)) else [block]

    # -- what subclasses provide -------------------------------------------------------------
    def backbone_blocks(self) -> Sequence[nn.Module]:
        """The backbone's repeated units, in order."""
        raise NotImplementedError

    def backbone_block_prefix(self) -> str:
        """Module path of the blocks container inside the backbone (e.g. 'blocks')."""
        raise NotImplementedError

    def stem_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters used before the first block."""
        raise NotImplementedError

    def embed(self, inputs: Any) -> tuple[torch.Tensor, Any]:
        """Run the stem; return hidden states and the context blocks need (e.g. a mask)."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Run one block."""
        return block(hidden)

    def finish(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Final norm and pooling: hidden states -> one vector per example."""
        raise NotImplementedError

    def block_channels(self, index: int) -> int:
        """Width of block `index`'s output (the hidden size for token models)."""
        return self.hidden_size

    # -- shared machinery ----------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """Backbone blocks followed by appended (`deep`) blocks."""
        return [*self.backbone_blocks(), *self.extra_blocks]

    def block_names(self) -> list[str]:
        """Module names of `blocks()`, relative to the tower."""
        prefix = self.backbone_block_prefix()
        names = [f"backbone.{prefix}.{i}" for i in range(len(self.backbone_blocks()))]
        return names + [f"extra_blocks.{i}" for i in range(len(self.extra_blocks))]

    @property
    def num_blocks(self) -> int:
        """Number of blocks, appended ones included."""
        return len(self.backbone_blocks()) + len(self.extra_blocks)

    def _runnable_blocks(self) -> list[nn.Module]:
        """Blocks in execution order: backbone blocks with inserted ones after them, then appended ones."""
        if not self.can_split:
            return list(self.extra_blocks)
        order: list[nn.Module] = []
        for i, block in enumerate(self.backbone_blocks()):
            order.append(block)
            if str(i) in self.inserted_blocks:
                order.extend(self.inserted_blocks[str(i)])
        return order + list(self.extra_blocks)

    def frozen_prefix_depth(self) -> int | None:
        """Leading runnable blocks with no trainable parameter; None when the stem itself trains."""
        if not self.can_split:
            stem = self.backbone.parameters()
        else:
            stem = self.stem_parameters()
        if any(p.requires_grad for p in stem):
            return None
        blocks = self._runnable_blocks()
        for i, block in enumerate(blocks):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return len(blocks)

    def forward_prefix(self, inputs: Any, depth: int) -> tuple[torch.Tensor, Any]:
        """Stem and the first `depth` blocks (what a feature cache can store)."""
        hidden, context = self.embed(inputs)
        for block in self._runnable_blocks()[:depth]:
            hidden = self.run_block(block, hidden, context)
        return hidden, context

    def forward_suffix(self, hidden: torch.Tensor, context: Any, depth: int) -> torch.Tensor:
        """Blocks from `depth` on, then the finish: the part of the tower that trains."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self._runnable_blocks()[depth:]:
            for piece in self._recompute_pieces(block) if recompute else [block]:
                # A piece whose BatchNorm updates running statistics would update them twice when run again.
                if recompute and not _updates_bn_stats(piece):
                    # Non-reentrant: any input may need no gradient, and the RNG is replayed (same dropout masks).
                    hidden = checkpoint(self.run_block, piece, hidden, context, use_reentrant=False)
                else:
                    hidden = self.run_block(piece, hidden, context)
        return self.finish(hidden, context)

    def _recompute_pieces(self, block: nn.Module) -> list[nn.Module]:
        """What gradient checkpointing recomputes one at a time: each block of a CNN stage (an nn.Sequential,
        where lilt hooks only inner blocks) - a whole stage would hold most of the tower's activations at once."""
        if self.block_kind == "cnn" and isinstance(block, nn.Sequential) and len(block) > 1:
            return list(block)
        return [block]

    def forward(self, inputs: Any) -> torch.Tensor:
        """Pooled features, with the frozen prefix run under no_grad."""
        # Gradients w.r.t. the input (saliency maps, adversarial examples) need the whole graph.
        wants_input_grad = isinstance(inputs, torch.Tensor) and inputs.requires_grad
        depth = self.frozen_prefix_depth() if torch.is_grad_enabled() and not wants_input_grad else None
        guard = torch.no_grad() if depth is not None else contextlib.nullcontext()
        with guard:
            hidden, context = self.forward_prefix(inputs, depth or 0)
        return self.forward_suffix(hidden, context, depth or 0)

    def train(self, mode: bool = True) -> "Tower":
        """Train mode, except that pretrained BatchNorm statistics stay frozen when configured."""
        super().train(mode)
        if mode and getattr(self, "freeze_bn_stats", False):
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def is_pristine_key(self, key: str) -> bool:
        """Whether a tower state-dict key is a pretrained backbone tensor (peft renames included)."""
        if not key.startswith("backbone."):
            return False
        key = key[len("backbone."):].replace(".base_layer.", ".")
        return key in self.pristine_keys


def _updates_bn_stats(block: nn.Module) -> bool:
    """Whether a forward pass of `block` in its current mode moves BatchNorm running statistics."""
    return any(isinstance(m, _BatchNorm) and m.training and m.track_running_stats for m in block.modules())
