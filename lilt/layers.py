"""Reusable trainable modules that methods and growth add to frozen towers; each can start as the identity.

- `Bottleneck`: s * up(act(down(x))), the adapter of LilT/Houlsby (Linear on tokens, 1x1 convs on maps);
- `GatedBlock`: x + g * (block(x) - x), any shape-preserving block behind a zero gate (ReZero-style);
- `SharedEncoder`: GrowCLIP's transformer blocks shared by both modalities on their pooled features;
- `TokenBlock`: a pre-LN transformer block over the positions of a CNN feature map;
- `vit_block` / `new_cnn_block`: fresh timm blocks, optionally zeroed into the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias in place (the end of a residual branch that must start silent)."""
    nn.init.zeros_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


class Bottleneck(nn.Module):
    """s * up(act(down(x))) on the last dim (tokens) or on channels with 1x1 convs (images)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", scale: float = 1.0,
                 zero_init: bool = True, conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if conv else nn.Linear
        self.down = layer(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.up = layer(hidden, dim)
        self.scale = scale
        if zero_init:
            zero_(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution, to be added to a residual stream."""
        return self.scale * self.up(self.act(self.down(x)))


class GatedBlock(nn.Module):
    """x + gate * (block(x) - x): any shape-preserving block that starts as the identity."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The gated block's output (the input itself while the gate is 0)."""
        out = self.block(hidden, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return hidden + self.gate * (out - hidden)


def vit_block(width: int, mlp_ratio: float = 4.0, identity: bool = False) -> nn.Module:
    """A fresh timm pre-LN transformer block; `identity` zeroes both residual branches' output projections."""
    from timm.models.vision_transformer import Block

    heads = next(h for h in (8, 4, 2, 1) if width % h == 0 and (width // h >= 16 or h == 1))
    block = Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True)
    if identity:
        zero_(block.attn.proj)
        zero_(block.mlp.fc2)
    return block


def new_cnn_block(channels: int, act: type[nn.Module] = nn.ReLU, identity: bool = True) -> nn.Module:
    """A fresh inverted-residual block (channels -> channels); `identity` zeroes its last BatchNorm scale."""
    from timm.models._efficientnet_blocks import InvertedResidual

    block = InvertedResidual(channels, channels, dw_kernel_size=3, exp_ratio=6.0, act_layer=act)
    if identity:
        nn.init.zeros_(block.bn3.weight)  # the residual branch ends in bn3: a zero scale makes the block the identity
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
        self.blocks = nn.ModuleList(vit_block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.ModuleDict({m: nn.Linear(width, dims[m]) for m in self.MODALITIES})
        for proj in self.out_proj.values():
            zero_(proj)

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
        self.block = vit_block(channels, mlp_ratio, identity=identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), positions attending to each other."""
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when `x` is laid out that way (and not also plain contiguous), else contiguous."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
