"""Frozen layers that keep only what their backward pass reads (`VisionConfig`/`TextConfig.lean_backward`).

A PEFT plan that trains BatchNorm affines or adapters in every block of a frozen CNN still back-propagates
through every frozen convolution. PyTorch's convolution node keeps its input for a weight gradient that a
frozen weight never asks for, and timm's `BatchNormAct2d` keeps its input for the affine's gradient *and*,
through the in-place activation, its output for the activation's: per conv -> BN -> act unit, two
activation-sized tensors where one is enough. Measured on EfficientNet-Lite0 under `lwa` (batch 32, 224 px,
bf16 autocast): 1244 MiB kept for the backward by the stock layers, 445 MiB by these. Here a frozen
convolution keeps only its (small) weight, and a BatchNorm with frozen statistics keeps only its input,
recomputing the normalisation and the activation's mask in the backward (elementwise work, no GEMM). Gradients
are the ones PyTorch computes (the same ATen backward kernels), so nothing else changes; training BatchNorm
statistics, a trainable convolution weight, `torch.no_grad` and an input that needs no gradient take the stock
path. A frozen Linear (transformer towers) likewise keeps neither its input nor, under autocast, a bf16 copy
of its weight (both the towers' text layers and a ViT's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import pad_same


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward computes the input gradient only, so the input is not kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                geometry: tuple[Any, Any, Any, int]) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, *geometry)
        ctx.save_for_backward(weight)  # the parameter itself: no extra memory
        ctx.geometry = geometry
        ctx.input_meta = (x.shape, x.dtype, _memory_format(x))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        shape, dtype, memory_format = ctx.input_meta
        # Only the input's size is read when the mask asks for the input gradient alone (torch.nn.grad.conv2d_input
        # passes the same one-element stand-in).
        dummy = grad_out.new_empty(1).expand(shape)
        grad_x = torch.ops.aten.convolution_backward(
            grad_out, dummy, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            (True, False, False))[0]
        return grad_x.to(dtype=dtype, memory_format=memory_format), None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the tensor is laid out so (lilt's EfficientNet towers are), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _only_input_needs_grad(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether, of this Linear/convolution call, only the input needs a gradient (weight and bias frozen)."""
    frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    return frozen and x.requires_grad and torch.is_grad_enabled()


def _lean_conv(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether this convolution call can take the lean node."""
    # padding="same"/"valid" (a string) has no explicit amounts for the backward kernel: the stock path.
    return _only_input_needs_grad(conv, x) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class LeanConv2d(nn.Conv2d):
    """nn.Conv2d that, with a frozen weight and bias, keeps no input for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock convolution; the lean node when only the input needs a gradient."""
        if not _lean_conv(self, x):
            return super().forward(x)
        return _FrozenConv2d.apply(x, self.weight, self.bias, (self.stride, self.padding, self.dilation, self.groups))


class LeanConv2dSame(Conv2dSame):
    """timm's TF-"same" Conv2dSame, lean in the same way (the padded copy of the input is not kept either)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad as timm does, then the lean node when only the input needs a gradient."""
        if not _lean_conv(self, x):
            return super().forward(x)
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return _FrozenConv2d.apply(x, self.weight, self.bias, (self.stride, (0, 0), self.dilation, self.groups))


class _FrozenLinear(torch.autograd.Function):
    """linear whose backward computes the input gradient only, so neither the input nor (under autocast) a
    low-precision copy of the weight is kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        return (grad_out @ weight.to(grad_out.dtype)).to(ctx.input_dtype), None, None


class LeanLinear(nn.Linear):
    """nn.Linear that, with a frozen weight and bias, keeps no input for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock layer; the lean node when only the input needs a gradient."""
        if not _only_input_needs_grad(self, x):
            return super().forward(x)
        return _FrozenLinear.apply(x, self.weight, self.bias)


class _FrozenStatsBatchNormAct(torch.autograd.Function):
    """Eval-mode batch_norm + activation keeping only the input; the backward recomputes both."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, module: nn.Module) -> torch.Tensor:
        z = F.batch_norm(x, module.running_mean, module.running_var, weight, bias, False, 0.0, module.eps)
        ctx.save_for_backward(x, weight, bias)
        ctx.module = module
        return module.act(z)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        m = ctx.module
        grad_z = _activation_backward(m.act, grad_y, lambda: F.batch_norm(
            x, m.running_mean, m.running_var, weight, bias, False, 0.0, m.eps))
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z.contiguous(memory_format=_memory_format(x)), x, weight, m.running_mean, m.running_var, None, None,
            False, m.eps, mask)
        return grad_x, grad_w, grad_b, None


def _activation_backward(act: nn.Module, grad_y: torch.Tensor, pre_activation: Any) -> torch.Tensor:
    """Gradient at the activation's input, from its output gradient and a recomputation of its input."""
    if isinstance(act, nn.Identity):
        return grad_y
    z = pre_activation()
    # Written over the recomputed input (ours alone; grad_y may also flow down a residual branch): one
    # activation-sized buffer less at the backward's peak.
    if isinstance(act, nn.ReLU6):
        return torch.ops.aten.hardtanh_backward.grad_input(grad_y, z, 0.0, 6.0, grad_input=z)
    if isinstance(act, nn.ReLU):
        return torch.ops.aten.threshold_backward.grad_input(grad_y, z, 0.0, grad_input=z)
    with torch.enable_grad():  # any other elementwise activation: its own backward, on a copy (it may be in place)
        z = z.detach().requires_grad_()
        (grad_z,) = torch.autograd.grad(act(z.clone()), z, grad_y)
    return grad_z


class LeanBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d that, with frozen statistics, keeps only its input for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock module; the lean node in eval-mode statistics when a gradient flows."""
        lean = (not self.training and self.running_mean is not None and self.weight is not None
                and isinstance(self.drop, nn.Identity) and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad))
        if not lean:
            return super().forward(x)
        return _FrozenStatsBatchNormAct.apply(x, self.weight, self.bias, self)


# Exact classes only: a subclass may change forward in ways the lean twin would skip.
_LEAN = {nn.Conv2d: LeanConv2d, Conv2dSame: LeanConv2dSame, BatchNormAct2d: LeanBatchNormAct2d, nn.Linear: LeanLinear}


def make_lean(module: nn.Module) -> int:
    """Switch a backbone's Linear, Conv2d, timm Conv2dSame and BatchNormAct2d layers to their lean twins; returns
    how many.

    The classes change in place (same parameters, buffers and state-dict keys), so peft and plans that wrap
    or unfreeze these layers later see ordinary Conv2d / BatchNormAct2d instances.
    """
    count = 0
    for m in module.modules():
        lean = _LEAN.get(type(m))
        if lean is not None:
            m.__class__ = lean
            count += 1
    return count
