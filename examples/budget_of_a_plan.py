"""Build a dual encoder from the packaged backbones, apply LilT's best plan, inspect and save it.

    python examples/budget_of_a_plan.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

import torch

import lilt


def main(output_dir: str = "demo-out/example") -> None:
    """Apply a plan written in Python, print its budget, save and reload the checkpoint."""
    model = lilt.DualEncoder.from_backbones("packaged:efficientnet-lite0", "packaged:multilingual-e5-small")
    plan = lilt.TuningPlan([
        # layer-wise adapters in every block of both towers (LilT), smaller in the text tower's top layers
        lilt.Rule(tower="both", method="adapter", options={"reduction_factor": 4}),
        lilt.Rule(tower="both", method="layernorm"),
        lilt.Rule(tower="text", method="unlock", layers="top:1", options={"what": "attention"}),
    ], name="lwa+top-attention")
    lilt.apply_plan(model, plan)
    print(lilt.budget(model))

    model.eval()
    with torch.inference_mode():
        texts = model.encode_text(["a cat", "un gato", "a red car"])
    print("text embeddings:", tuple(texts.shape), "(heads untrained: similarities mean nothing yet)")
    path = model.save_pretrained(output_dir)
    again = lilt.DualEncoder.from_pretrained(path).eval()
    with torch.inference_mode():
        same = torch.allclose(texts, again.encode_text(["a cat", "un gato", "a red car"]), atol=1e-6)
    print(f"saved to {path}/ and reloaded: identical embeddings = {same}")


if __name__ == "__main__":
    main(*sys.argv[1:])
