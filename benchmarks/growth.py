"""Growth while data grows (GrowCLIP in lilt): does growing a small model as stages of data arrive pay off?

builtin:emoji-cldr (English + 150 Swahili + 150 Yoruba pairs, as the demo) is revealed in 3 stages
(20% / 50% / 100% of the training pairs). Every run trains the same number of steps on the same batches,
so the training compute per step differs only by the trainable part:

  small          the starting plan (adapters in the top 2 blocks of each tower, reduction 16, + their norms)
  large          the final grown architecture from step 0 (all growth ops applied up front, m = 1)
  grow-m1        small, grown at stages 2 and 3 (function-preserving: momentum m = 1)
  grow-m<1       the same with momentum inheritance m < 1 (each m in --momenta; the best is reported as (d))
  grow-no-migr   grow-m1 with a fresh AdamW after each growth (optimizer_state: reset) instead of migration

After each stage the test split is scored (R@1, i2t and t2i, per language). Results go to
benchmarks/results/growth.{json,md,png} with the device and wall-clock seconds of each run.

    python benchmarks/growth.py --quick      # CPU, under 15 minutes
    python benchmarks/growth.py              # more steps (a GPU run is the intended use)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lilt
from lilt.config import DataConfig, TrainConfig
from lilt.data import load_pairs
from lilt.growth import Inheritance, grow_
from lilt.training import train

RESULTS = Path(__file__).resolve().parent / "results"
LANGS = ["en", "sw", "yo"]
FRACTIONS = [0.2, 0.5, 1.0]
# What grows when stage 2 and stage 3 start: wider adapters everywhere, then one more block per tower.
STAGE_OPS = [[], ["width:adapter:2", "depth:text:1"], ["width:adapter:2", "depth:vision:1"]]
PLAN = {"name": "top2-adapters", "rules": [
    {"tower": "both", "method": "adapter", "layers": "top:2", "options": {"reduction_factor": 16}},
    {"tower": "both", "method": "layernorm", "layers": "top:2"}]}


def build(image_size: int, seed: int) -> lilt.DualEncoder:
    """The starting model: packaged backbones, the small plan, the demo's temperature floor."""
    torch.manual_seed(seed)
    model = lilt.DualEncoder.from_backbones(vision_options={"image_size": image_size}, init_temperature=0.1,
                                            min_temperature=0.1)
    lilt.apply_plan(model, lilt.TuningPlan.from_dict(PLAN))
    return model


def stages(steps: int, grow: bool, momentum: float = 1.0, optimizer_state: str = "migrate") -> list[dict[str, Any]]:
    """The staged schedule: data fractions, steps per stage, and the growth ops (none for fixed models)."""
    return [{"steps": steps, "data": fraction, "grow": ops if grow else [], "inherit_momentum": momentum,
             "optimizer_state": optimizer_state} for fraction, ops in zip(FRACTIONS, STAGE_OPS)]


def run(name: str, args: argparse.Namespace, test: Any, grow: bool, momentum: float = 1.0,
        optimizer_state: str = "migrate", pregrow: bool = False) -> dict[str, Any]:
    """Train one configuration stage by stage; test recall and trainable parameters after each stage."""
    model = build(args.image_size, args.seed)
    if pregrow:  # the fixed large model: the final architecture from the first step, function-preserving
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            for op in (op for ops in STAGE_OPS for op in ops):
                grow_(model, op, Inheritance())
    data = DataConfig(source="builtin:emoji-cldr", langs=LANGS, pairs_per_lang={"sw": 150, "yo": 150},
                      augment="crop-flip", num_workers=args.num_workers)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            output_dir=out, steps=3 * args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10,
            head_warmup_epochs=30, head_warmup_batch_size=128, eval_batch_size=128, log_every=10, report_to=[],
            resume="never", seed=args.seed, growth=stages(args.steps, grow, momentum, optimizer_state))
        began = time.perf_counter()
        # The test split stands in for validation data: no run selects anything on it (no candidate search),
        # and the loop then scores it at every stage end.
        result = train(model, data, config, val_data=test)
        seconds = time.perf_counter() - began
    per_stage = []
    for summary in result.stages:
        row = {"stage": summary["stage"], "pairs": summary["pairs"], "trainable": summary["trainable"],
               "growth": summary["growth"]}
        for lang in [*LANGS, "all"]:
            for direction in ("i2t", "t2i"):
                row[f"{lang}/{direction}/R@1"] = round(summary.get(f"val/{lang}/{direction}/R@1", float("nan")), 2)
        row["mean/R@1"] = round(sum(row[f"{lang}/{d}/R@1"] for lang in LANGS for d in ("i2t", "t2i")) / 6, 2)
        per_stage.append(row)
    param_steps = sum(r["trainable"] * args.steps for r in per_stage)
    print(f"{name}: {seconds:.0f} s, final mean R@1 {per_stage[-1]['mean/R@1']}", flush=True)
    return {"name": name, "momentum": momentum, "optimizer_state": optimizer_state, "seconds": round(seconds, 1),
            "samples_per_second": round(result.samples_per_second, 2), "trainable_param_steps": param_steps,
            "stages": per_stage}


def average(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every per-stage number; `mean/R@1 range` keeps the spread of the headline one."""
    out = {k: v for k, v in seeds[0].items() if k not in ("stages", "seconds", "samples_per_second")}
    out["seconds"] = round(sum(s["seconds"] for s in seeds) / len(seeds), 1)
    out["samples_per_second"] = round(sum(s["samples_per_second"] for s in seeds) / len(seeds), 2)
    stages_ = []
    for i, first in enumerate(seeds[0]["stages"]):
        row = dict(first)
        for key, value in first.items():
            if "R@1" in key:
                row[key] = round(sum(s["stages"][i][key] for s in seeds) / len(seeds), 2)
        values = [s["stages"][i]["mean/R@1"] for s in seeds]
        row["mean/R@1 range"] = [min(values), max(values)]
        stages_.append(row)
    out["stages"] = stages_
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results table: mean test R@1 (en/sw/yo, i2t and t2i) and trainable parameters per stage."""
    runs = report["runs"]
    lines = [f"# Growth benchmark ({report['device']}, {report['mode']})", "",
             f"builtin:emoji-cldr ({', '.join(LANGS)}), stages reveal {', '.join(f'{f:.0%}' for f in FRACTIONS)} of "
             f"the training pairs, {report['steps_per_stage']} steps x batch {report['batch_size']} per stage; "
             f"image size {report['image_size']}; seeds {report['seeds']} (means; stage 3 with its range over seeds). "
             "Test R@1 (%) = mean over en/sw/yo of i2t and t2i.", "",
             "| run | stage 1 R@1 | stage 2 R@1 | stage 3 R@1 | en i2t | sw i2t | yo i2t | trainable per stage | "
             "param-steps (rel.) | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = runs[0]["trainable_param_steps"]
    for r in runs:
        s = r["stages"]
        sizes = " / ".join(f"{x['trainable']:,}" for x in s)
        spread = s[2]["mean/R@1 range"]
        final = f"{s[2]['mean/R@1']}" + (f" ({spread[0]}-{spread[1]})" if len(r["seeds"]) > 1 else "")
        lines.append(f"| {r['label']} | {s[0]['mean/R@1']} | {s[1]['mean/R@1']} | {final} | "
                     f"{s[2]['en/i2t/R@1']} | {s[2]['sw/i2t/R@1']} | {s[2]['yo/i2t/R@1']} | "
                     f"{sizes} | {r['trainable_param_steps'] / base:.2f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Growth ops: stage 2 {STAGE_OPS[1]}, stage 3 {STAGE_OPS[2]}. Best m < 1: {report['best_momentum']}.",
              "Param-steps: trainable parameters x steps summed over stages, relative to the small model (the",
              "frozen backbones' forward cost is the same for every run)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean test R@1 and trainable parameters per stage, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["runs"]:
        stages_ = [s["stage"] for s in r["stages"]]
        left.plot(stages_, [s["mean/R@1"] for s in r["stages"]], marker="o", label=r["label"])
        right.plot(stages_, [s["trainable"] / 1e6 for s in r["stages"]], marker="o", label=r["label"])
    left.set(xlabel="stage (data revealed: 20% / 50% / 100%)", ylabel="test R@1 (%), mean en/sw/yo i2t+t2i",
             xticks=[1, 2, 3])
    right.set(xlabel="stage", ylabel="trainable parameters (M)", xticks=[1, 2, 3])
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.grid(alpha=0.3)
    fig.suptitle(f"Growth while data grows ({report['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and write growth.json / .md / .png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized: fewer steps and smaller images")
    parser.add_argument("--steps", type=int, help="steps per stage (default 25 quick, 150 full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="default 96 quick, 160 full")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.5, 0.9], help="m < 1 values for (d)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per configuration (mean and "
                        "range reported): initialization draws, data order, augmentation, stage subsets")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (25 if args.quick else 150)
    args.image_size = args.image_size or (96 if args.quick else 160)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'}" \
        f", {torch.get_num_threads()} threads)"
    test = load_pairs("builtin:emoji-cldr", "test", langs=LANGS)
    began = time.perf_counter()
    configs = [("small", "(a) fixed small", {"grow": False}),
               ("large", "(b) fixed large", {"grow": False, "pregrow": True}),
               ("grow-m1", "(c) growth, m = 1", {"grow": True}),
               *[(f"grow-m{m}", f"(d) growth, m = {m}", {"grow": True, "momentum": m}) for m in args.momenta],
               ("grow-no-migration", "(e) growth, m = 1, no optimizer migration",
                {"grow": True, "optimizer_state": "reset"})]
    runs = []
    for name, label, options in configs:
        seeds = []
        for seed in args.seeds:
            args.seed = seed
            seeds.append(run(name, args, test, **options))
        runs.append(dict(average(seeds), label=label, seeds=args.seeds, per_seed=seeds))
    best = max((r for r in runs if r["label"].startswith("(d)")), key=lambda r: r["stages"][-1]["mean/R@1"])
    default = (25, 96) if args.quick else (150, 160)
    mode = ("quick" if args.quick else "full") if (args.steps, args.image_size) == default else "custom"
    report = {"device": device, "mode": mode, "steps_per_stage": args.steps,
              "batch_size": args.batch_size, "image_size": args.image_size, "lr": args.lr, "seeds": args.seeds,
              "stage_ops": STAGE_OPS, "fractions": FRACTIONS, "plan": PLAN, "best_momentum": best["momentum"],
              "total_seconds": round(time.perf_counter() - began, 1), "torch": torch.__version__,
              "python": sys.version.split()[0], "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "growth.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "growth.md").write_text(markdown(report))
    plot(report, args.out / "growth.png")
    print(markdown(report))
    print(f"total {report['total_seconds']:.0f} s; wrote {args.out / 'growth.json'}, growth.md, growth.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
