"""Training speed of lilt vs open_clip on the same towers and the same trainable sets, side by side in one run.

Step rows: each configuration trains on a synthetic batch (random images, fixed token ids) through lilt
(its model, plan, loss and optimizer) and through open_clip 3.3 (CustomTextCLIP over the same timm and HF
trunks with the same weights; its lock flags, its ClipLoss, AdamW over its trainable parameters). Reported:
median training samples/s, the forward(+loss) / backward / optimizer split, the no-grad forward and the
process's peak resident memory. End-to-end rows: whole `lilt.train` runs over builtin:emoji-cldr pairs
(data loading, and the feature cache's fill where `train.cache=auto`, included), 5 epochs, against
open_clip heads-only over a plain DataLoader of the same pairs and transform.

Every measurement runs in a fresh process (so its peak RSS is its own), warm-up steps excluded, the
configurations and builders interleaved round by round; the tables give medians over rounds.

    pip install 'lilt[bench]'                     # open-clip-torch; without it only lilt is measured
    python benchmarks/speed.py --threads 2        # CPU: benchmarks/results/speed_cpu.{json,md,png}
    python benchmarks/speed.py --device cuda      # GPU: speed_cuda.*
    python benchmarks/speed.py --configs e2e-heads-cache --pairs pairs   # prepares the pairs table in pairs/;
                                                  # carried elsewhere, --pairs pairs runs there without the fonts
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._speed_report import report  # noqa: E402
from benchmarks._speed_runs import CONFIGS, E2E, Spec, run_child  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_E2E = ("e2e-heads-cache", "e2e-deep-cache", "e2e-open_clip-heads")
MARK = "SPEED-RESULT "


def has_open_clip() -> bool:
    """Whether open_clip is importable (the optional extra lilt[bench])."""
    return importlib.util.find_spec("open_clip") is not None


def choose(names: str | None) -> list[str]:
    """Configurations named by --configs (comma-separated), in table order; default all step rows + DEFAULT_E2E."""
    every = [*CONFIGS, *E2E]
    if names is None:
        return [*CONFIGS, *DEFAULT_E2E]
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in every]
    if unknown:
        raise SystemExit(f"speed.py: unknown configs {unknown}; choose from {', '.join(every)}.")
    return [n for n in every if n in asked]


def plan_runs(configs: list[str], open_clip: bool) -> list[tuple[str, str]]:
    """(config, builder) pairs of one round: open_clip beside lilt where it has the same trainable set."""
    runs = []
    for name in configs:
        if name in E2E:
            if E2E[name][0] == "lilt" or open_clip:
                runs.append((name, E2E[name][0]))
        else:
            runs += [(name, b) for b in ("open_clip", "lilt") if b == "lilt" or (open_clip and CONFIGS[name][1])]
    return runs


def prepare_pairs(folder: Path, max_pairs: int | None, seed: int = 0) -> int:
    """The demo's training pairs of builtin:emoji-cldr (en + 150 sw + 150 yo), image bytes embedded, saved to
    `folder` (a save_to_disk table: one split, so lilt.train runs no validation); returns the number of pairs."""
    from lilt.config import DataConfig
    from lilt.data.resolve import resolve_data
    from lilt.recipe import Recipe

    spec = Recipe.from_file(REPO / "recipes" / "demo.yaml", [f"data.max_pairs={max_pairs}"] if max_pairs else [])
    table, _, _ = resolve_data(None, DataConfig.from_dict({**spec.data.to_dict(), "curate": None}), seed)
    table = table.select_columns(["image", "text", "lang"])

    def embed(row: dict[str, Any]) -> dict[str, Any]:
        image = row["image"]
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        return {"image": {"bytes": data, "path": None}}

    table.map(embed, features=table.features, desc="pairs").save_to_disk(str(folder))
    return len(table)


def pairs_table(folder: Path, max_pairs: int | None) -> int:
    """The end-to-end rows' pairs in `folder`: read when it holds a table (one prepared elsewhere and carried to a
    machine without builtin:emoji-cldr's fonts), else prepared there; returns the number of pairs."""
    if (folder / "dataset_info.json").is_file():
        from datasets import load_from_disk

        return len(load_from_disk(str(folder)))
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"speed.py: --pairs {folder} is not a pairs table (no dataset_info.json) and is not an "
                         f"empty folder; give a new or empty folder to prepare the table in, or one prepared "
                         f"earlier by --pairs.")
    return prepare_pairs(folder, max_pairs)


def child(spec: Spec) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter pinned to `threads` threads; its result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec))],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"speed.py: the {spec.builder} run of {spec.config} failed (exit {proc.returncode}).")
    return json.loads(lines[-1][len(MARK):])


def save(stem: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Write the raw runs so far (atomically: a killed run keeps the finished ones)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    os.replace(tmp, stem.with_suffix(".json"))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    import lilt.config

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help=f"comma-separated, default all step rows + {','.join(DEFAULT_E2E)}; "
                                          f"known: {', '.join([*CONFIGS, *E2E])}")
    parser.add_argument("--threads", type=int, default=cores, help="torch threads per run (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every (config, builder), interleaved")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the end-to-end rows")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per caption")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the end-to-end rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=Path, help="folder of the end-to-end rows' pairs (a save_to_disk table): "
                        "read if it holds one, else prepared there from builtin:emoji-cldr (default: a temporary one)")
    parser.add_argument("--vision", default=lilt.config.DEFAULT_VISION)
    parser.add_argument("--text", default=lilt.config.DEFAULT_TEXT)
    parser.add_argument("--quick", action="store_true", help="a look, not a measurement: 3 steps, 1 warm-up, 2 epochs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of speed_<device>.{json,md,png}")
    parser.add_argument("--report", action="store_true", help="only rebuild the .md and .png from the .json")
    parser.add_argument("--smoke-towers", nargs=2, metavar=("VISION", "TEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.epochs = 3, 1, 2
    if args.smoke_towers:
        if args.results == RESULTS:
            raise SystemExit("speed.py: a smoke run measures nothing; give it its own --results.")
        args.vision, args.text = args.smoke_towers
        args.image_size, args.tokens, args.batch_size = 32, 8, 8
    if min(args.threads, args.batch_size, args.steps, args.rounds, args.epochs, args.image_size, args.tokens) < 1:
        raise SystemExit("speed.py: --threads, --batch-size, --steps, --rounds, --epochs, --image-size and --tokens "
                         "must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every chosen (config, builder) over the rounds; write speed_<device>.{json,md,png}."""
    args = parse(argv)
    if args.child:
        print(MARK + json.dumps(run_child(args.child)), flush=True)
        return 0
    stem = args.results / f"speed_{args.device.split(':')[0]}"
    if args.report:
        print(report(stem))
        return 0
    open_clip = has_open_clip()
    if not open_clip:
        print("speed.py: open_clip is not installed (pip install 'lilt[bench]'): measuring lilt alone.", flush=True)
    configs = choose(args.configs)
    runs_per_round = plan_runs(configs, open_clip)
    meta = {key: getattr(args, key) for key in ("threads", "batch_size", "steps", "warmup", "rounds", "epochs",
                                                "image_size", "tokens", "num_workers", "device", "vision", "text")}
    meta.update(device_name=device_name(args.device, args.threads), configs=configs, open_clip=open_clip,
                versions=versions(open_clip), smoke=bool(args.smoke_towers))
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lilt-speed-pairs-") as tmp:
        pairs = args.pairs or Path(tmp) / "pairs"
        if any(c in E2E for c in configs):
            meta["pairs"] = pairs_table(pairs, 64 if args.smoke_towers else None)
        for round_index in range(args.rounds):
            # Builders alternate who goes first, so drift over a round does not favour one.
            order = runs_per_round if round_index % 2 == 0 else [
                r for name in configs for r in reversed([x for x in runs_per_round if x[0] == name])]
            for config, builder in order:
                spec = Spec(config=config, builder=builder, vision=args.vision, text=args.text,
                            image_size=args.image_size, tokens=args.tokens, batch_size=args.batch_size,
                            steps=args.steps, warmup=args.warmup, threads=args.threads, device=args.device,
                            embed_dim=16 if args.smoke_towers else 256, data=str(pairs),
                            pairs=meta.get("pairs", 0), epochs=args.epochs, num_workers=args.num_workers)
                start = time.perf_counter()
                result = child(spec)
                result["round"] = round_index
                runs.append(result)
                save(stem, meta, runs)
                print(f"round {round_index + 1}/{args.rounds} {config:20s} {builder:9s} "
                      f"{result['samples_per_s']:8.1f} samples/s  peak RSS {result['peak_rss_mib']:6.0f} MiB  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    meta["wall_s"] = round(time.perf_counter() - began, 1)
    save(stem, meta, runs)
    print(report(stem))
    return 0


def device_name(device: str, threads: int) -> str:
    """A readable name of the device the numbers come from."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), "") if cpuinfo.exists() else platform.processor()
    from lilt.frozen_precision import native_bf16

    return f"CPU ({threads} threads) {model}, {'native' if native_bf16('cpu') else 'no native'} bf16".strip()


def versions(open_clip: bool) -> dict[str, str]:
    """Versions of the libraries measured."""
    import timm
    import torch
    import transformers

    import lilt

    out = {"lilt": lilt.__version__, "torch": torch.__version__, "timm": timm.__version__,
           "transformers": transformers.__version__}
    if open_clip:
        import open_clip as oc

        out["open_clip"] = oc.__version__
    return out


if __name__ == "__main__":
    sys.exit(main())
