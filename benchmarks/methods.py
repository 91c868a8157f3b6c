"""Per-recipe cost on real backbones: trainable share, checkpoint size, step time, activation memory.

Every recipe in recipes/methods is applied to the same pair of backbones. Step times are measured
side by side, round-robin over the recipes, and reported as ratios to `full` (these machines are
noisy; ratios from one run are comparable, absolute seconds are not). Activation memory is the
bytes autograd saves for the backward pass, counted exactly with saved-tensor hooks.

    python benchmarks/methods.py                   # packaged EfficientNet-Lite0 + multilingual-e5-small
    python benchmarks/methods.py --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lilt
from lilt.losses import clip_loss
from lilt.checkpoint import WEIGHTS_NAME

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    """A readable name of the device the numbers come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"CPU ({torch.get_num_threads()} threads) {model}"


def contrastive_step(model: lilt.DualEncoder, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                     text: dict[str, torch.Tensor]) -> None:
    """One symmetric InfoNCE step."""
    optimizer.zero_grad(set_to_none=True)
    out = model(images, **text)
    clip_loss(out.image_embeds, out.text_embeds, out.logit_scale, gather=False).backward()
    optimizer.step()


def saved_activation_bytes(model: lilt.DualEncoder, images: torch.Tensor, text: dict[str, torch.Tensor]) -> int:
    """Bytes of tensors autograd keeps for the backward pass of one forward."""
    total = 0
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        # Parameters are saved by reference and cost nothing extra; count each storage once.
        key = tensor.untyped_storage().data_ptr()
        if not isinstance(tensor, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, **text)
    return total


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_runs(base: lilt.DualEncoder, recipes: list[Path], device: torch.device, images: torch.Tensor,
                 text: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Apply each recipe to a copy of `base` and record what does not need timing."""
    full_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    runs = {}
    for recipe in recipes:
        model = copy.deepcopy(base)
        lilt.apply_plan(model, recipe)
        model.to(device).train()
        report = lilt.budget(model)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_bytes = (model.save_pretrained(tmp) / WEIGHTS_NAME).stat().st_size
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs[recipe.stem] = {"model": model, "optimizer": optimizer, "times": [], "row": {
            "recipe": recipe.stem, "trainable": report.trainable, "total": report.total,
            "percent": round(report.percent, 3), "vision_percent": report.by_tower["vision"]["percent"],
            "text_percent": report.by_tower["text"]["percent"], "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_percent_of_full": round(100 * checkpoint_bytes / full_bytes, 3),
            "activation_bytes": saved_activation_bytes(model, images, text)}}
    return runs


def time_round_robin(runs: dict[str, dict], device: torch.device, images: torch.Tensor,
                     text: dict[str, torch.Tensor], rounds: int) -> None:
    """Time one step of every recipe per round, interleaved, so machine noise hits all alike."""
    for round_index in range(rounds + 1):  # round 0 warms up allocators and kernels
        for run in runs.values():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            contrastive_step(run["model"], run["optimizer"], images, text)
            synchronize(device)
            if round_index:
                run["times"].append(time.perf_counter() - start)
            if device.type == "cuda":  # what one step adds on top of everything resident
                run["row"]["step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - resident


def summarize(runs: dict[str, dict]) -> list[dict]:
    """Median step times and every cost as a ratio to the `full` recipe."""
    reference = runs.get("full", next(iter(runs.values())))
    ref_time = statistics.median(reference["times"])
    ref_act = reference["row"]["activation_bytes"]
    ref_peak = reference["row"].get("step_peak_bytes", 0)
    rows = []
    for run in runs.values():
        row = run["row"]
        row["step_seconds"] = round(statistics.median(run["times"]), 4)
        row["step_time_vs_full"] = round(row["step_seconds"] / ref_time, 3)
        row["activations_vs_full"] = round(row["activation_bytes"] / max(ref_act, 1), 3)
        if ref_peak:
            row["step_memory_vs_full"] = round(row["step_peak_bytes"] / ref_peak, 3)
        rows.append(row)
    return rows


def write_results(rows: list[dict], meta: dict, tag: str) -> str:
    """Write methods-<tag>.json and .md under benchmarks/results; return the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"methods-{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = [f"# Recipes on {meta['vision']} + {meta['text']}", "",
             f"Device: {meta['device']}; torch {meta['torch']}; batch {meta['batch_size']} at {meta['image_size']} "
             f"px; median of {meta['rounds']} round-robin steps. Full state dict: "
             f"{meta['full_state_dict_bytes'] / 1e6:.0f} MB. {meta['note']}", "",
             "Activations: bytes autograd saves for backward. Step memory (CUDA only): peak allocation one "
             "step adds (activations, gradients, optimizer state growth).", "",
             "| recipe | trainable | % of all | vision % | text % | checkpoint MB | % of full | step s | "
             "step vs full | activations vs full | step memory vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['recipe']} | {r['trainable']:,} | {r['percent']:.2f} | {r['vision_percent']:.2f} | "
                     f"{r['text_percent']:.2f} | {r['checkpoint_bytes'] / 1e6:.2f} | "
                     f"{r['checkpoint_percent_of_full']:.2f}"
                     f" | {r['step_seconds']:.3f} | {r['step_time_vs_full']:.2f} | {r['activations_vs_full']:.2f} | "
                     f"{r.get('step_memory_vs_full', '-')} |")
    markdown = "\n".join(table) + "\n"
    (RESULTS / f"methods-{tag}.md").write_text(markdown)
    return markdown


def main() -> None:
    """Measure every recipe and write benchmarks/results/methods-<device>.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default=lilt.config.DEFAULT_VISION)
    parser.add_argument("--text", default=lilt.config.DEFAULT_TEXT)
    parser.add_argument("--recipes", default="recipes/methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds (after one warm-up)")
    parser.add_argument("--tag", default=None, help="result file suffix (default: cpu or cuda)")
    parser.add_argument("--note", default="", help="a sentence recorded with the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = lilt.DualEncoder.from_backbones(args.vision, args.text)
    size = base.vision.data_config["input_size"][-1]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    captions = [f"a photo of thing number {i} on a table" for i in range(args.batch_size)]
    text = {k: v.to(device) for k, v in base.tokenize(captions).items()}
    meta = {"device": device_name(device), "torch": torch.__version__, "lilt": lilt.__version__,
            "vision": args.vision, "text": args.text, "batch_size": args.batch_size, "image_size": size,
            "rounds": args.rounds, "note": args.note,
            "full_state_dict_bytes": sum(t.numel() * t.element_size() for t in base.state_dict().values())}
    runs = prepare_runs(base, sorted(Path(args.recipes).glob("*.yaml")), device, images, text)
    del base
    time_round_robin(runs, device, images, text, args.rounds)
    print(write_results(summarize(runs), meta, args.tag or device.type))


if __name__ == "__main__":
    main()
