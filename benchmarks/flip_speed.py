"""FLIP's speed-up: vision train-step samples/s at model.vision.mask_ratio 0 vs 0.5, side by side in one run.

A random-init timm ViT (no download) as a lilt VisionTower with a linear head, every tower weight trained
(as FLIP trains), against fixed random text embeddings under the CLIP loss: the text tower does not
change with the mask ratio, so it is left out to show the vision side's gain. Settings alternate in short
bursts so both see the same machine noise; each burst's first step (allocations) is not timed.

    python benchmarks/flip_speed.py                                   # vit_tiny_patch16_224, batch 16
    python benchmarks/flip_speed.py --model vit_small_patch16_224 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from lilt.config import VisionConfig
from lilt.losses import clip_loss
from lilt.towers.vision import VisionTower


def build(model: str, ratio: float) -> tuple[VisionTower, torch.nn.Linear, torch.optim.Optimizer]:
    """The same random-init tower (seed 0) with patch dropping at `ratio`, a head, and AdamW over both."""
    torch.manual_seed(0)
    tower = VisionTower.from_config(VisionConfig(name=model, pretrained=False, mask_ratio=ratio))
    head = torch.nn.Linear(tower.hidden_size, 256)
    params = [*tower.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    return tower.train(), head, torch.optim.AdamW(params, lr=1e-4)


def burst(setup: tuple, images: torch.Tensor, texts: torch.Tensor, steps: int) -> float:
    """Samples/s over `steps` timed train steps, after one untimed one."""
    tower, head, optimizer = setup
    began = 0.0
    for i in range(steps + 1):
        if i == 1:
            began = time.perf_counter()
        loss = clip_loss(F.normalize(head(tower(images)), dim=-1), texts, torch.tensor(14.3), gather=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * len(images) / (time.perf_counter() - began)


def measure(model: str = "vit_tiny_patch16_224", ratio: float = 0.5, batch_size: int = 16, steps: int = 3,
            rounds: int = 3) -> dict[str, Any]:
    """Alternate bursts of mask ratio 0 and `ratio`; samples/s of each burst, their medians and the speed-up."""
    settings = {0.0: build(model, 0.0), ratio: build(model, ratio)}
    size = settings[0.0][0].data_config["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    texts = F.normalize(torch.randn(batch_size, 256, generator=generator), dim=-1)
    rates: dict[float, list[float]] = {r: [] for r in settings}
    for _ in range(rounds):
        for r, setup in settings.items():
            rates[r].append(burst(setup, images, texts, steps))
    median = {r: statistics.median(v) for r, v in rates.items()}
    return {"model": model, "ratio": ratio, "batch_size": batch_size, "steps": steps, "rounds": rounds,
            "threads": torch.get_num_threads(), "bursts": rates, "samples_per_s": median,
            "speedup": median[ratio] / median[0.0]}


def main() -> None:
    """Print samples/s at each mask ratio and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--ratio", type=float, default=0.5, help="mask ratio compared with 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per burst")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per setting (alternating)")
    args = parser.parse_args()
    m = measure(args.model, args.ratio, args.batch_size, args.steps, args.rounds)
    print(f"{args.model}, batch {args.batch_size}, {m['threads']} thread(s), "
          f"{args.rounds} x {args.steps} steps per setting")
    for ratio, value in m["samples_per_s"].items():
        bursts = ", ".join(f"{x:.1f}" for x in m["bursts"][ratio])
        print(f"  mask_ratio {ratio:.2f}: {value:.1f} samples/s (bursts: {bursts})")
    print(f"speed-up at mask_ratio {args.ratio}: {m['speedup']:.2f}x")


if __name__ == "__main__":
    main()
