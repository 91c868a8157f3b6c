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

peft's LoRA on a frozen 1x1 convolution or Linear (`lora` plan) runs as one node too: peft's forward casts the
input to the adapter's fp32 (under bf16 autocast: a full-size copy, then cast back by the convolution), runs
B(A(x)) into a full-size tensor, scales it and adds it, and the backward walks each of those again. Here the
update is added into the base output by one in-place GEMM on the rank-r projection, and its backward adds the
branch's input gradient into the base's the same way: on the packaged EfficientNet those elementwise passes at
full resolution were most of what `lora` cost beyond the other plans.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import pad_same_arg
from peft.tuners.lora import layer as lora_layer


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward computes the input gradient only, so the input is not kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                geometry: tuple[Any, Any, Any, int], pads: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        padded = x if pads is None else _pad(x, pads)
        out = F.conv2d(padded, weight, bias, *geometry)
        ctx.save_for_backward(weight)  # the parameter itself: no extra memory
        ctx.geometry, ctx.pads, ctx.padded_shape = geometry, pads, padded.shape
        ctx.input_meta = (x.shape, x.dtype, _memory_format(x))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        shape, dtype, memory_format = ctx.input_meta
        # Only the input's size and layout are read when the mask asks for the input gradient alone. The stand-in is
        # allocated but never written (no compute); it must have the input's layout: oneDNN picks its kernels' layout
        # from it, and a one-element expand (torch.nn.grad.conv2d_input's stand-in) reads as NCHW, which made a
        # channels_last depthwise convolution's input gradient 3.6x slower, plus a copy back to channels_last.
        dummy = torch.empty(ctx.padded_shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format)
        grad_x = torch.ops.aten.convolution_backward(
            grad_out, dummy, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            (True, False, False))[0]
        if ctx.pads is not None:  # the padded input's gradient: keep the input's part
            left, _, top, _ = ctx.pads
            grad_x = grad_x[:, :, top:top + shape[2], left:left + shape[3]]
        return grad_x.to(dtype=dtype, memory_format=memory_format), None, None, None, None


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad(x, pads) with zeros, in x's layout: the input copied into the interior and only the border zeroed
    (F.pad zeroes the whole output first: at EfficientNet's first stride-2 convolution, 157 MB written twice)."""
    left, right, top, bottom = pads
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    out[:, :, top:top + h, left:left + w].copy_(x)
    for border in (out[:, :, :top], out[:, :, top + h:], out[:, :, :, :left], out[:, :, :, left + w:]):
        border.zero_()
    return out


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
        """The stock layer; the lean node, padding as timm does, when only the input needs a gradient."""
        if not _lean_conv(self, x):
            return super().forward(x)
        pads = tuple(pad_same_arg(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation))  # as pad_same
        return _FrozenConv2d.apply(x, self.weight, self.bias, (self.stride, (0, 0), self.dilation, self.groups),
                                   pads if any(pads) else None)


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


def _rows(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """(rows, channels) of an image tensor in channels_last (conv) or of a (..., features) tensor: a view of `t`
    when it is laid out so (the lean LoRA node's inputs and outputs are), else of a copy."""
    if conv:
        t = t.contiguous(memory_format=torch.channels_last)
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # a view: channels are the fastest dimension
    return t.reshape(-1, t.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the stock layer would compute in: autocast's when it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LeanLoRA(torch.autograd.Function):
    """base(x) + scaling * B(A(x)) for a frozen 1x1 convolution or Linear base, with no full-size intermediate."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, conv: bool) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            bias_c = None if bias is None else bias.to(dtype)
            out = F.conv2d(xc, weight.to(dtype), bias_c) if conv else F.linear(xc, weight.to(dtype), bias_c)
            # Laid out for a row view, so the update lands in `out` (already so: no copy).
            out = out.contiguous(memory_format=torch.channels_last if conv else torch.contiguous_format)
            z2 = _rows(xc, conv) @ a.reshape(a.shape[0], -1).to(dtype).T  # (rows, r): the only new activation
            _rows(out, conv).addmm_(z2, b.reshape(b.shape[0], -1).to(dtype).T, alpha=scaling)  # into `out`
        ctx.save_for_backward(xc, z2, weight, a, b)
        ctx.meta = (x.dtype, x.shape, scaling, conv)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, z2, weight, a, b = ctx.saved_tensors
        x_dtype, x_shape, scaling, conv = ctx.meta
        dtype = xc.dtype
        g2 = _rows(grad_out.to(dtype), conv)
        a2 = a.reshape(a.shape[0], -1).to(dtype)
        b2 = b.reshape(b.shape[0], -1).to(dtype)
        u2 = g2 @ b2  # (rows, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = (torch.mm(u2.T, _rows(xc, conv)) * scaling).to(a.dtype).view(a.shape)
        if ctx.needs_input_grad[4]:
            # (r, rows) @ (rows, out), then transposed: the (out, rows) @ (rows, r) order ran ~10x slower on CPU.
            grad_b = (torch.mm(z2.T, g2).T * scaling).to(b.dtype).reshape(b.shape)
        if ctx.needs_input_grad[0]:
            gx2 = g2 @ weight.reshape(weight.shape[0], -1).to(dtype)
            gx2.addmm_(u2, a2, alpha=scaling)
            if conv:
                n, c, h, w = x_shape
                grad_x = gx2.view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last, as the input was
            else:
                grad_x = gx2.view(x_shape)
            grad_x = grad_x.to(x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _lean_lora_branch(layer: lora_layer.LoraLayer, x: torch.Tensor) -> tuple[nn.Module, nn.Module, float] | None:
    """(A, B, scaling) when this peft LoRA call is the plain case the lean node computes, else None."""
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    a, b, base = layer.lora_A[name], layer.lora_B[name], layer.get_base_layer()
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if a.bias is not None or b.bias is not None:
        return None
    if isinstance(base, nn.Conv2d):
        pointwise = all(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)
                        and c.dilation == (1, 1) and c.groups == 1 for c in (base, a, b))
        if not (pointwise and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            return None
    elif not (isinstance(base, nn.Linear) and x.dim() >= 2 and x.is_contiguous()):
        return None
    return a, b, float(layer.scaling[name])


class _LeanLoraForward:
    """forward of the lean peft LoRA twins (mixed in before peft's class, whose forward stays the fallback)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's forward, or the lean node in the plain case (one adapter, no dropout, no variant)."""
        branch = None if args or kwargs else _lean_lora_branch(self, x)
        if branch is None:
            return super().forward(x, *args, **kwargs)
        a, b, scaling = branch
        base = self.get_base_layer()
        return _LeanLoRA.apply(x, base.weight, base.bias, a.weight, b.weight, scaling, isinstance(base, nn.Conv2d))


class LeanLoraConv2d(_LeanLoraForward, lora_layer.Conv2d):
    """peft's LoRA Conv2d; a frozen 1x1 base on a channels_last input runs as one lean node."""


class LeanLoraLinear(_LeanLoraForward, lora_layer.Linear):
    """peft's LoRA Linear over a frozen base, as one lean node in the plain case."""


# Exact classes only: a subclass may change forward in ways the lean twin would skip.
_LEAN = {nn.Conv2d: LeanConv2d, Conv2dSame: LeanConv2dSame, BatchNormAct2d: LeanBatchNormAct2d, nn.Linear: LeanLinear,
         lora_layer.Conv2d: LeanLoraConv2d, lora_layer.Linear: LeanLoraLinear}


def make_lean(module: nn.Module) -> int:
    """Switch a backbone's Linear, Conv2d, timm Conv2dSame, BatchNormAct2d and peft LoRA layers to their lean twins;
    returns how many.

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
