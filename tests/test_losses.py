"""Losses against brute-force references written with Python loops over pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lilt.losses import clip_loss, siglip_loss, simclr_loss


def _embeds(n: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):  # image i should pick caption i among all captions
        logits = [scale * float(img[i] @ txt[j]) for j in range(n)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    for j in range(n):  # caption j should pick image j
        logits = [scale * float(txt[j] @ img[i]) for i in range(n)]
        total += -logits[j] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


def _siglip_reference(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * (scale * float(img[i] @ txt[j]) + bias)))
    return total / n


def _simclr_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    views = F.normalize(torch.cat([a, b]), dim=-1)
    m, total = len(a), 0.0
    for i in range(2 * m):
        positive = (i + m) % (2 * m)
        logits = {j: float(views[i] @ views[j]) / t for j in range(2 * m) if j != i}
        total += -logits[positive] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / (2 * m)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_brute_force(scale: float) -> None:
    img, txt = _embeds()
    assert float(clip_loss(img, txt, torch.tensor(scale))) == pytest.approx(_clip_reference(img, txt, scale), rel=1e-5)


def test_clip_loss_is_low_for_matching_pairs_and_refuses_mismatched_counts() -> None:
    img, _ = _embeds()
    matched = float(clip_loss(img, img, torch.tensor(50.0)))
    assert matched < 0.05 < float(clip_loss(img, img.flip(0), torch.tensor(50.0)))
    with pytest.raises(ValueError, match="one caption per image"):
        clip_loss(img, img[:3], torch.tensor(1.0))


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0)])
def test_siglip_loss_matches_brute_force(scale: float, bias: float) -> None:
    img, txt = _embeds()
    got = float(siglip_loss(img, txt, torch.tensor(scale), torch.tensor(bias)))
    assert got == pytest.approx(_siglip_reference(img, txt, scale, bias), rel=1e-5)


def test_simclr_loss_matches_brute_force() -> None:
    a, b = _embeds(seed=1)
    assert float(simclr_loss(a, b, 0.1)) == pytest.approx(_simclr_reference(a, b, 0.1), rel=1e-5)


def test_clip_loss_gradient_matches_autograd_of_reference_formula() -> None:
    img, txt = (x.clone().requires_grad_() for x in _embeds())
    scale = torch.tensor(10.0, requires_grad=True)
    clip_loss(img, txt, scale).backward()
    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    scale2 = torch.tensor(10.0, requires_grad=True)
    logits = scale2 * img2 @ txt2.t()
    ref = -(torch.log_softmax(logits, 1).diagonal().mean() + torch.log_softmax(logits, 0).diagonal().mean()) / 2
    ref.backward()
    for got, want in ((img.grad, img2.grad), (txt.grad, txt2.grad), (scale.grad, scale2.grad)):
        assert torch.allclose(got, want, atol=1e-6)
