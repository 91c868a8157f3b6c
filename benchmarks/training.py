"""Training throughput on real backbones and data: samples/s per recipe, and 2 processes vs 1.

Recipes run through the real loop (`lilt.train`: data loading, augmentation, tokenization, loss,
optimizer) on `builtin:emoji-cldr`, round-robin in short bursts so that every recipe sees the same
machine noise; throughput counts steps after each burst's first (which pays for starting workers).
The 2-process run uses `accelerate launch` with recipes/accelerate/cpu-2proc.yaml (or a GPU config)
on the same global batch, and is compared with one process in the same run.

    python benchmarks/training.py                       # CPU: layernorm, lwa, full
    python benchmarks/training.py --rounds 1 --steps 4  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

import lilt
from lilt.config import DataConfig, TrainConfig
from lilt.training import train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))
from methods import device_name  # noqa: E402


def burst_rate(history: list[dict], batch_size: int) -> float:
    """Samples/s over a burst, leaving out its first step (worker start-up, first-touch allocations)."""
    timed = [h for h in history if "seconds" in h]
    (first, last) = timed[0], timed[-1]
    return (last["step"] - first["step"]) * batch_size / (last["seconds"] - first["seconds"])


def recipe_rates(recipes: list[str], args: argparse.Namespace, data: DataConfig) -> dict[str, list[float]]:
    """Round-robin bursts of `args.steps` steps per recipe; samples/s of each burst."""
    models = {}
    for name in recipes:
        torch.manual_seed(0)
        model = lilt.DualEncoder.from_backbones()
        lilt.apply_plan(model, REPO / "recipes" / "methods" / f"{name}.yaml")
        models[name] = model.to(args.device)
    rates: dict[str, list[float]] = {name: [] for name in recipes}
    for round_ in range(args.rounds):
        for name, model in models.items():
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(output_dir=out, steps=args.steps, batch_size=args.batch_size, log_every=1,
                                     report_to=[], resume="never", warmup_steps=1, seed=round_)
                result = train(model, data, config)
            rates[name].append(burst_rate(result.history, args.batch_size))
            print(f"round {round_} {name}: {rates[name][-1]:.2f} samples/s", flush=True)
    return rates


def process_rates(args: argparse.Namespace, data: DataConfig) -> dict[str, float]:
    """Samples/s of `lilt train` on one process and on two (same recipe, same global batch)."""
    recipe = {"plan": yaml.safe_load((REPO / "recipes" / "methods" / "layernorm.yaml").read_text())["plan"],
              "data": data.to_dict(),
              "train": {"steps": args.steps * 2, "batch_size": args.batch_size, "log_every": 1, "report_to": [],
                        "resume": "never", "warmup_steps": 1}}
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        for processes in (1, 2):
            run_dir = Path(tmp) / f"p{processes}"
            cmd = [sys.executable, "-m", "lilt.cli", "train", "--recipe", str(path), "--output-dir", str(run_dir)]
            if processes == 2:
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.launch_config,
                       *cmd[1:]]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // processes))}
            subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
            history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
            out[f"{processes}"] = burst_rate(history, args.batch_size)
            print(f"{processes} process(es): {out[str(processes)]:.2f} samples/s", flush=True)
    return out


def main() -> None:
    """Measure, print and write benchmarks/results/training-<device>.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["layernorm", "lwa", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="steps per burst")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launch-config", default=str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"))
    parser.add_argument("--no-processes", action="store_true", help="skip the 2-process comparison")
    args = parser.parse_args()
    data = DataConfig(source="builtin:emoji-cldr", langs=["en"], num_workers=2, augment="crop-flip")
    rates = recipe_rates(args.recipes, args, data)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    procs = {} if args.no_processes else process_rates(args, data)
    device = device_name(torch.device(args.device))
    report = {"device": device, "batch_size": args.batch_size, "steps_per_burst": args.steps, "rounds": args.rounds,
              "samples_per_second": medians, "bursts": rates, "processes": procs}
    lines = ["# Training throughput on packaged EfficientNet-Lite0 + multilingual-e5-small, builtin:emoji-cldr",
             "", f"Device: {device}; global batch {args.batch_size} at 224 px (the backbones' default); median of "
             f"{args.rounds} round-robin bursts of {args.steps} steps through `lilt.train` (data loading and "
             "augmentation included).", "",
             "| recipe | samples/s | vs full |", "|---|---:|---:|"]
    base = medians.get("full")
    lines += [f"| {n} | {v:.2f} | {v / base:.2f} |" if base else f"| {n} | {v:.2f} | - |" for n, v in medians.items()]
    if procs:
        lines += ["", "`layernorm` through `lilt train`, same global batch: 1 process "
                  f"{procs['1']:.2f} samples/s, 2 processes {procs['2']:.2f} samples/s "
                  f"(ratio {procs['2'] / procs['1']:.2f})."]
    RESULTS.mkdir(exist_ok=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    (RESULTS / f"training-{kind}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"training-{kind}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
