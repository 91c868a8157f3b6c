"""lilt.lean: frozen convolutions and frozen-statistics BatchNorm+activation keep less for the backward pass,
with the gradients PyTorch's stock layers give."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

from peft import LoraConfig, inject_adapter_in_model

from lilt.lean import (LeanBatchNormAct2d, LeanConv2d, LeanConv2dSame, LeanLinear, LeanLoraConv2d, LeanLoraLinear,
                       make_lean)
from lilt.plan import TuningPlan, apply_plan


def _net(act: type[nn.Module]) -> nn.Sequential:
    """conv -> BN+act -> "same"-padded strided depthwise conv -> BN+act -> conv -> BN, with random statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=act),
        Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False), BatchNormAct2d(8, act_layer=act),
        nn.Conv2d(8, 4, 1), BatchNormAct2d(4, apply_act=False))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _bn_affine_only(net: nn.Module) -> nn.Module:
    for name, p in net.named_parameters():
        p.requires_grad_(isinstance(net.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d))
    return net


def _step(net: nn.Module, x: torch.Tensor, bf16: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, gradients of the trainable tensors (and of x), and the bytes autograd kept for the backward."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.clone().requires_grad_(True)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        y = net(x)
    (y.float() ** 2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad] + [x.grad]
    return y.detach().float(), grads, sum(kept.values())


@pytest.mark.parametrize("act", [nn.ReLU6, nn.ReLU, nn.SiLU])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [16, 15])  # the "same" padding: (0, 1) per side of an even size, (1, 1) of an odd
def test_lean_layers_give_stock_gradients_and_keep_less(act: type[nn.Module], channels_last: bool, size: int) -> None:
    stock = _bn_affine_only(_net(act))
    lean = copy.deepcopy(stock)
    assert make_lean(lean) == 6
    assert [type(m) for m in lean] == [LeanConv2d, LeanBatchNormAct2d, LeanConv2dSame, LeanBatchNormAct2d,
                                       LeanConv2d, LeanBatchNormAct2d]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stock, lean = stock.to(memory_format=fmt), lean.to(memory_format=fmt)
    x = torch.randn(4, 3, size, size).contiguous(memory_format=fmt)
    y0, g0, kept0 = _step(stock, x)
    y1, g1, kept1 = _step(lean, x)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert g1[-1].is_contiguous(memory_format=fmt)  # the input gradient keeps the input's layout
    # Stock: each conv keeps its input, each BN its input and (in-place act) its output; lean: each BN its input.
    assert kept1 < 0.6 * kept0, (kept0, kept1)


def test_lean_under_bf16_autocast_matches_stock() -> None:
    stock = _bn_affine_only(_net(nn.ReLU6))
    lean = copy.deepcopy(stock)
    make_lean(lean)
    x = torch.randn(4, 3, 16, 16)
    y0, g0, _ = _step(stock, x, bf16=True)
    y1, g1, _ = _step(lean, x, bf16=True)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_frozen_linear_keeps_neither_its_input_nor_a_weight_copy(bf16: bool) -> None:
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8)).requires_grad_(False)
    stock[1].requires_grad_(True)  # LayerNorm tuning between two frozen layers
    lean = copy.deepcopy(stock)
    assert make_lean(lean) == 2 and isinstance(lean[0], LeanLinear)
    x = torch.randn(4, 5, 8)
    y0, g0, kept0 = _step(stock, x, bf16)
    y1, g1, kept1 = _step(lean, x, bf16)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert kept1 < 0.7 * kept0, (kept0, kept1)


def test_trainable_weights_train_statistics_and_no_grad_take_the_stock_path() -> None:
    stock = _net(nn.ReLU6)  # everything trainable: the conv weights need their inputs
    lean = copy.deepcopy(stock)
    make_lean(lean)
    x = torch.randn(4, 3, 16, 16)
    _, g0, kept0 = _step(stock, x)
    _, g1, kept1 = _step(lean, x)
    assert len(g1) == len(g0) and kept1 >= 0.6 * kept0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # A string padding ("same") and a non-zero padding mode have no lean node; they train as before.
    odd = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                        nn.LayerNorm(16)).requires_grad_(False)
    odd[2].requires_grad_(True)
    lean_odd = copy.deepcopy(odd)
    assert make_lean(lean_odd) == 2
    x_odd = torch.randn(2, 3, 16, 16)
    for a, b in zip(_step(odd, x_odd)[1], _step(lean_odd, x_odd)[1]):
        torch.testing.assert_close(b, a)
    # Train-mode BatchNorm still updates its running statistics.
    lean.train()
    before = lean[1].running_mean.clone()
    _bn_affine_only(lean)(torch.randn(4, 3, 16, 16)).sum().backward()
    assert not torch.equal(lean[1].running_mean, before)
    with torch.no_grad():
        assert lean.eval()(x).grad_fn is None


class _LoraNet(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> Linear over channels: the layers peft's LoRA wraps in lilt's towers."""

    def __init__(self) -> None:
        super().__init__()
        self.pw, self.pwl, self.fc = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1, bias=False), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pwl(torch.relu(self.pw(x))).permute(0, 2, 3, 1))


def _lora_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    net = _LoraNet().requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["pw", "pwl", "fc"]),
                            net)
    for m in net.modules():
        if hasattr(m, "lora_B"):  # peft zero-initialises B; a trained adapter has both factors non-zero
            nn.init.normal_(m.lora_B["default"].weight)
    return net


def test_lean_lora_gives_peft_outputs_and_gradients() -> None:
    stock = _lora_net()
    lean = copy.deepcopy(stock)
    make_lean(lean)
    assert (type(lean.pw), type(lean.pwl), type(lean.fc)) == (LeanLoraConv2d, LeanLoraConv2d, LeanLoraLinear)
    fresh = copy.deepcopy(stock), copy.deepcopy(lean)  # _step accumulates into .grad
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    y0, g0, _ = _step(stock, x)
    y1, g1, _ = _step(lean, x)
    assert len(g1) == len(g0) == 7  # three A, three B, and the input
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):  # summed in another order: fp32 rounding of gradients up to ~20
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert g1[-1].is_contiguous(memory_format=torch.channels_last)
    assert "LeanLoRA" in type(lean.pw(x).grad_fn).__name__
    # Under bf16 autocast both round differently: lean is about as far from the fp32 result as peft is.
    errors = []
    for net in fresh:
        y, g, _ = _step(net, x, bf16=True)
        assert all(b.dtype == a.dtype for a, b in zip(g0, g))
        errors.append(torch.tensor([((b - a).norm() / a.norm()).item() for a, b in zip((y0, *g0), (y, *g))]))
    assert (errors[1] < 1.5 * errors[0] + 0.005).all() and errors[1].max() < 0.05, errors
    with torch.no_grad():
        torch.testing.assert_close(lean(x), stock(x), rtol=1e-5, atol=1e-5)


def test_lean_lora_leaves_other_cases_to_peft() -> None:
    x = torch.randn(2, 8, 5, 7)
    contiguous = _lora_net()
    make_lean(contiguous)
    assert "LeanLoRA" not in type(contiguous.pw(x.requires_grad_()).grad_fn).__name__  # NCHW: no row view
    dropout = _lora_net(dropout=0.5)
    make_lean(dropout)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert "LeanLoRA" not in type(dropout.pw(cl).grad_fn).__name__
    unfrozen = _lora_net()
    make_lean(unfrozen)
    unfrozen.pw.base_layer.weight.requires_grad_(True)
    assert "LeanLoRA" not in type(unfrozen.pw(cl).grad_fn).__name__
    unfrozen.pw.merge()
    assert "LeanLoRA" not in type(unfrozen.pw(cl).grad_fn).__name__


@pytest.mark.parametrize("method", ["layernorm", "lora"])
def test_towers_are_lean_by_default_and_train_the_same(make_model, method: str) -> None:
    plan = TuningPlan.from_dict({"name": method, "rules": [{"tower": "both", "method": method, "layers": "all"}]})
    models = []
    for lean in (True, False):
        model = make_model("cnn", vision_options={"image_size": 32, "lean_backward": lean},
                           text_options={"lean_backward": lean})
        apply_plan(model, plan)
        torch.manual_seed(0)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                for b in m.lora_B.values():
                    nn.init.normal_(b.weight, std=0.1)
        models.append(model.eval())  # no dropout: both runs see the same text activations
    kinds = [{type(m).__name__ for m in model.modules()} for model in models]
    assert {"LeanBatchNormAct2d", "LeanConv2d", "LeanLinear"} <= kinds[0]
    if method == "lora":
        assert {"LeanLoraConv2d", "LeanLoraLinear"} <= kinds[0]
    assert not any(k.startswith("Lean") for k in kinds[1])
    images = torch.randn(4, 3, 32, 32)
    grads = []
    for model in models:
        loss = model.encode_image(images).square().sum() + model.encode_text(["a red square", "a dog"]).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".backbone." in n})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("text.") for n in grads[0]) and any(n.startswith("vision.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
