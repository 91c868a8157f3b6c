"""Grow a small model as pairs in a new language arrive (GrowCLIP-style staged training), offline on CPU.

Stage 1 trains adapters in the top 2 blocks of each tower on 20% of the pairs; stage 2 (50%) adds a
trainable text block; stage 3 (all pairs) lets a short search pick between wider adapters and a shared
encoder. Then the grown model is saved, reloaded (the growth history rebuilds its architecture) and
grown once more by hand. About 5 minutes on 2 CPU cores:

    python examples/grow_while_data_arrives.py [--steps-per-stage 30]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import lilt
from lilt.growth import grow

PLAN = {"name": "top2-adapters", "rules": [
    {"tower": "both", "method": "adapter", "layers": "top:2", "options": {"reduction_factor": 16}},
    {"tower": "both", "method": "layernorm", "layers": "top:2"}]}


def main() -> None:
    """Train in three growing stages, then save, reload and grow offline."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps-per-stage", type=int, default=30)
    args = parser.parse_args()
    steps = args.steps_per_stage

    torch.manual_seed(0)
    model = lilt.DualEncoder.from_backbones(vision_options={"image_size": 96}, init_temperature=0.1,
                                            min_temperature=0.1)
    lilt.apply_plan(model, lilt.TuningPlan.from_dict(PLAN))
    print(lilt.budget(model), "\n")

    data = lilt.DataConfig(source="builtin:emoji-cldr", langs=["en", "sw"], pairs_per_lang={"sw": 200})
    with tempfile.TemporaryDirectory() as out:
        config = lilt.TrainConfig.from_dict({
            "output_dir": out, "steps": 3 * steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5,
            "report_to": [], "head_warmup_epochs": 20, "growth": [
                {"steps": steps, "data": 0.2},
                {"steps": steps, "data": 0.5, "grow": ["depth:text:1"]},
                {"steps": steps, "data": 1.0, "candidates": ["width:adapter:2", "shared:1:128"],
                 "search_steps": max(1, steps // 3)}]})
        result = lilt.train(model, config=config, data_config=data)
        for stage in result.stages:
            print(f"stage {stage['stage']}: {stage['pairs']} pairs, {stage['trainable']:,} trainable, grew "
                  f"{stage['growth'] or 'nothing'}, validation en i2t R@1 {stage.get('val/en/i2t/R@1', 0):.1f}, "
                  f"sw i2t R@1 {stage.get('val/sw/i2t/R@1', 0):.1f}")
        print("search:", model.growth[-1].get("search"))

        model.save_pretrained(f"{out}/grown")
        again = lilt.DualEncoder.from_pretrained(f"{out}/grown")  # replays the growth history, loads tensors
        print("reloaded growth history:", [r["op"] for r in again.growth])

    wider = grow(again, "width:heads:2").model  # offline growth: same similarities, twice the embedding width
    images = torch.randn(2, 3, 96, 96)
    again.eval()
    wider.eval()
    with torch.no_grad():
        before, after = again.encode_image(images), wider.encode_image(images)
    print(f"embedding width {before.shape[1]} -> {after.shape[1]}; largest change of the old dimensions: "
          f"{float((before - after[:, :before.shape[1]]).abs().max()):.1e}")


if __name__ == "__main__":
    main()
