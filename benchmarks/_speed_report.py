"""The report of benchmarks/speed.py: medians over rounds, ratios, the acceptance checks, Markdown and a plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# The bounds the numbers are judged against: (what, row, ratio kind, bound, at least?).
CHECKS = (
    ("layernorm vs open_clip's same set", "layernorm", "vs_open_clip", 1.5, True),
    *((f"{p} vs lilt full", p, "vs_full", 1.6, True) for p in ("lwa", "lora", "bitfit")),
    *((f"{p} end to end vs open_clip heads-only end to end", p, "vs_open_clip_e2e", 5.0, True)
      for p in ("e2e-heads-cache", "e2e-deep-cache")),
    *((f"{p} peak RSS vs lilt full", p, "memory_vs_full", 0.5, False) for p in ("lwa", "layernorm")),
    *((f"{p} (gradient checkpointing) peak RSS vs lilt full", p, "memory_vs_full", 0.5, False)
      for p in ("lwa-ckpt", "layernorm-ckpt")),
    # The same bounds under bf16 autocast (train.mixed_precision=bf16), against lilt full in fp32.
    *((f"{p} vs lilt full (fp32)", p, "vs_full", 1.6, True) for p in ("lwa-bf16", "lora-bf16", "bitfit-bf16")),
    *((f"{p} peak RSS vs lilt full (fp32)", p, "memory_vs_full", 0.5, False) for p in ("lwa-bf16", "layernorm-bf16")),
    *((f"{p} {what} vs lilt full (fp32)", p, kind, bound, at_least)
      for p in ("lwa-ckpt-bf16", "layernorm-ckpt-bf16")
      for what, kind, bound, at_least in (("speed", "vs_full", 1.6, True), ("peak RSS", "memory_vs_full", 0.5, False))),
    # bf16 autocast with the frozen weights stored in bf16 (train.frozen_dtype=bfloat16): both bounds at once.
    *((f"{p} vs lilt full (fp32)", p, "vs_full", 1.6, True) for p in ("lwa-bf16-fw", "lora-bf16-fw", "bitfit-bf16-fw")),
    *((f"{p} peak RSS vs lilt full (fp32)", p, "memory_vs_full", 0.5, False)
      for p in ("lwa-bf16-fw", "layernorm-bf16-fw")),
    *((f"{p} vs open_clip's same set", p, "vs_open_clip", 1.0, True)
      for p in ("full", "lock-image", "text-ln", "heads")),
    # Not a bound of its own: how far any plan that trains in every block could go (see CONFIGS' floor rows).
    ("floor (norms of the bottom blocks alone) vs lilt full", "floor", "vs_full", 1.6, True),
    ("floor-bf16-fw vs lilt full (fp32)", "floor-bf16-fw", "vs_full", 1.6, True),
)
E2E_REFERENCE = "e2e-open_clip-heads"


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


def memory_key(meta: dict[str, Any]) -> str:
    """The peak memory a run is judged by: the GPU's peak allocation on CUDA (host RSS there is the
    interpreter and CUDA's libraries, not the training), the process's peak RSS on CPU."""
    return "cuda_peak_mib" if str(meta.get("device", "cpu")).startswith("cuda") else "peak_rss_mib"


def summarize(runs: list[dict[str, Any]], memory: str = "peak_rss_mib") -> dict[str, Any]:
    """Per config and builder: medians over rounds (samples/s, split, no-grad, RSS) and each round's samples/s;
    then the ratios the checks read (`memory_vs_full` compares the `memory` peaks: RSS on CPU, GPU on CUDA)."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        grouped.setdefault(run["config"], {}).setdefault(run["builder"], []).append(run)
    rows: dict[str, Any] = {}
    for config, builders in grouped.items():
        row: dict[str, Any] = {}
        for builder, done in builders.items():
            row[builder] = {
                "samples_per_s": _median(done, "samples_per_s"),
                "rounds": [round(r["samples_per_s"], 2) for r in sorted(done, key=lambda r: r["round"])],
                "split_s": {k: _median(done, "split_s", k) for k in ("forward", "backward", "optimizer")},
                "nograd_samples_per_s": _median(done, "nograd_samples_per_s"),
                "peak_rss_mib": _median(done, "peak_rss_mib"), "cuda_peak_mib": _median(done, "cuda_peak_mib"),
                "wall_s": _median(done, "wall_s"), "percent": done[0].get("percent"),
                "trainable": done[0].get("trainable"), "notes": done[0].get("notes", [])}
        rows[config] = row
    full = rows.get("full", {}).get("lilt", {})
    reference = rows.get(E2E_REFERENCE, {}).get("open_clip", {})
    for config, row in rows.items():
        lilt, oc = row.get("lilt", {}), row.get("open_clip", {})
        row["vs_open_clip"] = _ratio(lilt.get("samples_per_s"), oc.get("samples_per_s"))
        row["vs_full"] = _ratio(lilt.get("samples_per_s"), full.get("samples_per_s"))
        row["memory_vs_full"] = _ratio(lilt.get(memory), full.get(memory))
        if config.startswith("e2e-"):
            row["vs_open_clip_e2e"] = _ratio(lilt.get("samples_per_s"), reference.get("samples_per_s"))
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def checks(rows: dict[str, Any], memory: str = "peak_rss_mib") -> list[dict[str, Any]]:
    """Each acceptance bound with the measured ratio and pass/fail (None: not measured in this run)."""
    out = []
    for what, row, kind, bound, at_least in CHECKS:
        if memory == "cuda_peak_mib":
            what = what.replace("peak RSS", "peak GPU memory")
        value = rows.get(row, {}).get(kind)
        ok = None if value is None else (value >= bound if at_least else value <= bound)
        out.append({"check": what, "value": value, "bound": f"{'>=' if at_least else '<='} {bound}x", "pass": ok})
    return out


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _rounds(run: dict[str, Any]) -> str:
    """'median (round 1, round 2, ...)' of a builder's samples/s, or '-' when it did not run."""
    if run.get("samples_per_s") is None:
        return "-"
    return f"{run['samples_per_s']:.1f} ({', '.join(f'{x:.1f}' for x in run['rounds'])})"


def markdown(meta: dict[str, Any], rows: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The report: step rows, the split, end-to-end rows, the checks, and what open_clip needed by hand."""
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    memory = memory_key(meta)
    peak = "peak GPU MiB" if memory == "cuda_peak_mib" else "peak RSS MiB"
    lines = [f"# lilt vs open_clip: training speed ({meta['device_name']})", "",
             f"{meta['vision']} + {meta['text']}; fp32, batch {meta['batch_size']}, {meta['image_size']} px, "
             f"{meta['tokens']} tokens; {meta['steps']} timed steps after {meta['warmup']} warm-up, "
             f"{meta['rounds']} interleaved rounds, each run a fresh process; medians over rounds. {versions}."
             + (" **Smoke run on tiny towers: these numbers measure nothing.**" if meta.get("smoke") else "")
             + (f" {meta['note']}." if meta.get("note") else ""), "",
             "| config | % trainable (lilt / open_clip) | open_clip samples/s | lilt samples/s (rounds) | "
             f"lilt/open_clip | lilt/lilt-full | lilt {peak} (/ full) |", "|---|---:|---:|---:|---:|---:|---:|"]
    step_rows = [c for c in rows if not c.startswith("e2e-")]
    for config in step_rows:
        row = rows[config]
        lilt, oc = row.get("lilt", {}), row.get("open_clip", {})
        lines.append(f"| {config} | {_f(lilt.get('percent'), 3)} / {_f(oc.get('percent'), 3)} | "
                     f"{_f(oc.get('samples_per_s'))} | {_rounds(lilt)} | "
                     f"{_f(row['vs_open_clip'], 2, 'x')} | {_f(row['vs_full'], 2, 'x')} | "
                     f"{_f(lilt.get(memory), 0)} ({_f(row['memory_vs_full'], 2)}) |")
    lines += ["", "Where the time goes (median seconds per step: forward+loss / backward / optimizer) and the no-grad "
              "forward (eval mode, both towers, samples/s):", "",
              "| config | open_clip fwd / bwd / opt s | lilt fwd / bwd / opt s | open_clip no-grad | lilt no-grad | "
              f"open_clip {peak} |", "|---|---:|---:|---:|---:|---:|"]
    for config in step_rows:
        row = rows[config]
        split = {b: " / ".join(_f(row[b]["split_s"].get(k), 3) for k in ("forward", "backward", "optimizer"))
                 if b in row else "-" for b in ("open_clip", "lilt")}
        lines.append(f"| {config} | {split['open_clip']} | {split['lilt']} | "
                     f"{_f(row.get('open_clip', {}).get('nograd_samples_per_s'))} | "
                     f"{_f(row.get('lilt', {}).get('nograd_samples_per_s'))} | "
                     f"{_f(row.get('open_clip', {}).get(memory), 0)} |")
    e2e = [c for c in rows if c.startswith("e2e-")]
    if e2e:
        lines += ["", f"End to end: {meta['epochs']} epochs over {meta.get('pairs', '?')} builtin:emoji-cldr pairs "
                  f"(the demo's en + sw + yo), crop-flip, {meta['num_workers']} loader workers; data loading, model "
                  "preparation and the feature cache's fill (train.cache=auto) included, model loading not.", "",
                  "| run | samples/s (rounds) | wall s | vs open_clip heads-only | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|"]
        for config in e2e:
            row = rows[config]
            run = row.get("lilt") or row.get("open_clip") or {}
            lines.append(f"| {config} | {_rounds(run)} | {_f(run.get('wall_s'))} | "
                         f"{_f(row.get('vs_open_clip_e2e'), 2, 'x')} | {_f(run.get('peak_rss_mib'), 0)} |")
    lines += ["", "| check | measured | bound | |", "|---|---:|---:|---|"]
    for c in results:
        verdict = {True: "pass", False: "**fail**", None: "not measured"}[c["pass"]]
        lines.append(f"| {c['check']} | {_f(c['value'], 2, 'x')} | {c['bound']} | {verdict} |")
    notes = sorted({n for row in rows.values() for n in row.get("open_clip", {}).get("notes", [])})
    lines += ["", "open_clip's configuration: CustomTextCLIP(vision_cfg: timm_model_name = the tower's timm "
              "architecture, not pretrained, pool avg, proj linear; text_cfg: hf_model_name = the tower's folder, "
              "proj linear, the tower's pooling), both trunks loaded strictly from lilt's weights. Trainable sets: "
              "lock_image_tower(0) for lock-image, text-ln, heads and layernorm; lock_text_tower(0, "
              "freeze_layer_norm=False) for text-ln and layernorm, (0, True) for heads. "
              "By hand: " + ("; ".join(notes) or "nothing") + "."]
    return "\n".join(lines) + "\n"


def plot(meta: dict[str, Any], rows: dict[str, Any], file: Path) -> None:
    """Bars of samples/s per configuration, open_clip beside lilt (log scale: heads on a cache are far off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    for offset, builder, colour in ((-0.2, "open_clip", "#999999"), (0.2, "lilt", "#1f77b4")):
        values = [rows[n].get(builder, {}).get("samples_per_s") or 0 for n in names]
        ax.bar([i + offset for i in range(len(names))], values, 0.4, label=builder, color=colour)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("training samples/s")
    ax.set_title(f"lilt vs open_clip, {meta['device_name']}"[:80], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def report(stem: Path) -> str:
    """Read STEM.json (meta and raw runs), write the summary into it, STEM.md and STEM.png; return the Markdown."""
    data = json.loads(stem.with_suffix(".json").read_text())
    memory = memory_key(data["meta"])
    rows = summarize(data["runs"], memory)
    results = checks(rows, memory)
    data.update(summary=rows, checks=results)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(data["meta"], rows, results)
    stem.with_suffix(".md").write_text(text)
    plot(data["meta"], rows, stem.with_suffix(".png"))
    return text
