""""Scaling (Down) CLIP" (Li et al. 2023) on the project's own data: curation, augmentation, SLIP/FLIP, data size.

Every row is the demo recipe (LilT's layer-wise adapters + norms, EfficientNet-Lite0 + multilingual-e5-small)
trained on the Noto renders of builtin:emoji-cldr's training split (926 en + 150 sw + 150 yo pairs) and scored,
like benchmarks/claims.py (whose pieces it uses, benchmarks/_bench.py), on the **test split: emoji no step
saw**. Training steps are fixed, so a smaller share of the data is seen more often (equal compute).

- noise: 30% of the training captions re-paired with a wrong image (`data.options={noise: 0.3}`): all of
  them, a random 40% (a seeded 40% of each language's pairs), the crossfit scorer's top 40% (over all pairs,
  and within each language), top 20% and top 70% (`data.curate`: ridge maps on the frozen features fitted on
  the noisy pairs themselves, 5 folds of images), the top 40% by one map fitted on the validation split
  ('frozen' with its default trusted set: it lets validation shape training), against the clean data; ridge
  maps on the same data.
- aug: `data.augment` none / crop-flip (the demo's) / style / randaugment / stacked-randaugment, at 50% and
  100% of the pairs.
- slip: CLIP vs SLIP (`train.ssl_weight=1.0`; SimCLR views, and `style` views that keep colour), at 100% and
  25%; FLIP's speed (benchmarks/flip_speed.py: the demo's CNN tower cannot drop patches, so no accuracy row).
- size: 25 / 50 / 100% of the pairs for the lwa and layernorm plans.
- lr: each plan's learning rate, chosen on validation (claims.py's grid); run before the rows that use it.

    python benchmarks/scaling_down.py --quick            # 6 rows (noise), 60 steps, seed 0 (~20 min, 2 cores)
    python benchmarks/scaling_down.py --rows noise,base  # groups or row names, 3 seeds each; resumable
    python benchmarks/scaling_down.py --report           # tables and plot from what is on disk
    python benchmarks/scaling_down.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import (RESULTS, Bench, Row, _finish, collect_stat, fmt, load_results,  # noqa: E402
                               run_rows, select_rows, summarize, write_report)
from benchmarks.claims import chosen_lrs, rows as claims_rows  # noqa: E402
from lilt.data.emoji_cldr import load_emoji_cldr  # noqa: E402

ROW_DIR = RESULTS / "scaling_down"
TRAIN_PAIRS = {"en": 926, "sw": 150, "yo": 150}  # the demo's training pairs (split_seed 0; sw, yo capped at 150)
NOISE = "data.options={noise: 0.3}"
AUGMENTS = ("none", "style", "randaugment", "stacked-randaugment")  # crop-flip is the demo's: the lwa rows
# Three training rows (claims.py's quick lwa row took 314 s on 2 cores, evaluation included) and three ridge rows
# (the first computes the frozen features training reuses; the curated one scores the pairs once for the seed).
QUICK = ["ridge-clean", "ridge-noisy", "ridge-noisy-curated40", "lwa", "noisy", "noisy-curated40"]
FLIP_ARGS = {"model": "vit_tiny_patch16_224", "ratio": 0.5, "batch_size": 16, "steps": 3, "rounds": 3}


def share(fraction: float) -> str:
    """A seeded `fraction` of each language's training pairs (the training seed picks them)."""
    caps = ", ".join(f"{lang}: {round(n * fraction)}" for lang, n in TRAIN_PAIRS.items())
    return f"data.pairs_per_lang={{{caps}}}"


def curated(keep: float, per_lang: bool = False, scorer: str = "crossfit") -> str:
    """A scorer's top `keep` share of the training pairs (crossfit: ridge maps fitted on the pairs by folds)."""
    return f"data.curate={{scorer: {scorer}, keep: {keep}, per_lang: {str(per_lang).lower()}}}"


def rows() -> list[Row]:
    """Every row of the benchmark."""
    out = [r for r in claims_rows() if r.group == "lr" and r.plan in ("lwa", "layernorm")]
    out += [  # the ridge rows first: seconds each, so --quick shows something early
        Row("ridge-clean", "noise", "ridge", note="closed-form ridge map, clean pairs"),
        Row("ridge-noisy", "noise", "ridge", overrides=(NOISE,), note="the same, 30% noisy captions"),
        Row("ridge-noisy-curated40", "noise", "ridge", overrides=(NOISE, curated(0.4)),
            note="the same, crossfit scorer's top 40%"),
        Row("ridge-noisy-curated40-trusted", "noise", "ridge", overrides=(NOISE, curated(0.4, scorer="frozen")),
            note="the same, top 40% by one ridge map fitted on the validation split"),
        Row("lwa", "base", plan="lwa", note="the demo recipe: clean, all pairs, crop-flip, CLIP loss"),
        Row("noisy", "noise", plan="lwa", overrides=(NOISE,), note="all pairs, 30% noisy captions"),
        Row("noisy-random40", "noise", plan="lwa", overrides=(NOISE, share(0.4)),
            note="a random 40% of each language's pairs, 30% noisy"),
        Row("noisy-curated40", "noise", plan="lwa", overrides=(NOISE, curated(0.4)),
            note="crossfit scorer's top 40% over all pairs"),
        Row("noisy-curated40-trusted", "noise", plan="lwa", overrides=(NOISE, curated(0.4, scorer="frozen")),
            note="top 40% by one ridge map fitted on the validation split (which then shapes training)"),
        Row("noisy-curated70", "noise", plan="lwa", overrides=(NOISE, curated(0.7)),
            note="crossfit scorer's top 70% (the clean share)"),
        Row("noisy-curated40-per-lang", "noise", plan="lwa", overrides=(NOISE, curated(0.4, per_lang=True)),
            note="top 40% within each language"),
        Row("noisy-curated20", "noise", plan="lwa", overrides=(NOISE, curated(0.2)),
            note="crossfit scorer's top 20% over all pairs"),
    ]
    for aug in AUGMENTS:
        out += [Row(f"aug-{aug}", "aug", plan="lwa", overrides=(f"data.augment={aug}",), note=f"augment {aug}"),
                Row(f"aug-{aug}-50", "aug", plan="lwa", overrides=(f"data.augment={aug}", share(0.5)),
                    note=f"augment {aug}, 50% of the pairs")]
    slip = "train.ssl_weight=1.0"
    out += [
        Row("slip", "slip", plan="lwa", overrides=(slip,), note="SLIP: + SimCLR loss on two views (weight 1)"),
        Row("slip-style", "slip", plan="lwa", overrides=(slip, "train.ssl_augment=style"),
            note="SLIP with style views (no colour jitter, grayscale or flip)"),
        Row("slip-25", "slip", plan="lwa", overrides=(slip, share(0.25)), note="SLIP on 25% of the pairs"),
        Row("flip-speed", "slip", "flip", note="benchmarks/flip_speed.py: vision step samples/s, mask 0 vs 0.5",
            seeds=(0,)),
    ]
    for plan in ("lwa", "layernorm"):
        out += [Row(f"{plan}-{p}", "size", plan=plan, overrides=(share(p / 100),), note=f"{p}% of the pairs")
                for p in (25, 50)]
    out += [Row("layernorm", "size", plan="layernorm", note="norm layers only, all pairs")]
    return out


class ScalingBench(Bench):
    """claims.py's Bench, with curation scores shared between rows of a seed, and the FLIP speed row."""

    def __init__(self, quick: bool, out: Path, extra: Sequence[str] = (), scorer: str | None = None,
                 flip: dict[str, Any] | None = None) -> None:
        super().__init__(quick, out, extra)
        self.scratch = tempfile.TemporaryDirectory(prefix="scaling-down-")
        self.scorer, self.flip = scorer, flip or FLIP_ARGS
        english = len(load_emoji_cldr("train", langs=["en"]))
        if english != TRAIN_PAIRS["en"]:  # share()'s caps assume the demo split's 926 English training pairs
            raise SystemExit(f"scaling_down.py: builtin:emoji-cldr has {english} English training pairs, not "
                             f"{TRAIN_PAIRS['en']}; update TRAIN_PAIRS.")

    def recipe(self, row: Row, seed: int, lrs: dict[str, float]) -> Any:
        spec = super().recipe(row, seed, lrs)
        if spec.data.curate is None:
            return spec
        # One folder per seed: the rows of a seed score the same pairs, so later ones reuse the saved scores.
        changes: dict[str, Any] = {"out": str(Path(self.scratch.name) / f"seed{seed}-{spec.data.curate.scorer}")}
        if self.scorer:
            changes["scorer"] = self.scorer
        data = dataclasses.replace(spec.data, curate=dataclasses.replace(spec.data.curate, **changes))
        return dataclasses.replace(spec, data=data)

    def run(self, row: Row, seed: int, lrs: dict[str, float]) -> dict[str, Any]:
        if row.kind != "flip":
            return super().run(row, seed, lrs)
        from benchmarks.flip_speed import measure

        start = time.perf_counter()
        result = measure(**self.flip)
        result["samples_per_s"] = {f"{k:g}": v for k, v in result["samples_per_s"].items()}
        result["bursts"] = {f"{k:g}": v for k, v in result["bursts"].items()}
        return _finish({"row": row.name, "group": row.group, "seed": seed, "quick": self.quick, "flip": result},
                       start)


def smoke_bench(quick: bool, out: Path, towers: Sequence[str]) -> ScalingBench:
    """A bench over tiny local towers (vision, text), 2 steps: checks the wiring in seconds, measures nothing."""
    vision, text = towers
    extra = [f"model.vision.name={vision}", "model.vision.image_size=32", f"model.text.name={text}",
             "model.embed_dim=16", "train.steps=2", "train.warmup_steps=1", "train.batch_size=8",
             "train.head_warmup_epochs=1", "train.eval_every=0", "data.num_workers=0"]
    bench = ScalingBench(quick, out, extra, flip={"model": "vit_tiny_patch16_224", "ratio": 0.5, "batch_size": 2,
                                                  "steps": 1, "rounds": 1})
    scorer = Path(bench.scratch.name) / "scorer"
    bench.frozen.model.save_pretrained(scorer)  # the frozen packaged towers would take minutes to score with
    bench.scorer = f"model:{scorer}"
    return bench


# -- report -------------------------------------------------------------------------------------------------
SECTIONS = (
    ("## Noisy captions: all, random, curated (30% of training captions re-paired)",
     ["lwa", "noisy", "noisy-random40", "noisy-curated40", "noisy-curated40-per-lang", "noisy-curated20",
      "noisy-curated70", "noisy-curated40-trusted", "ridge-clean", "ridge-noisy", "ridge-noisy-curated40",
      "ridge-noisy-curated40-trusted"]),
    ("## Augmentation (crop-flip = lwa, lwa-50)",
     ["lwa", *[f"aug-{a}" for a in AUGMENTS], "lwa-50", *[f"aug-{a}-50" for a in AUGMENTS]]),
    ("## CLIP vs SLIP", ["lwa", "slip", "slip-style", "lwa-25", "slip-25"]),
    ("## Data size", ["lwa-25", "lwa-50", "lwa", "layernorm-25", "layernorm-50", "layernorm"]),
)
HEAD = ("| row | pairs | noisy % | en i2t | en t2i | sw i2t | sw t2i | yo i2t | zero-pair i2t | zero-pair t2i | "
        "train-split en i2t | val mean recall | s/run | seeds |")


def extend(summary: dict[str, Any], found: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """summarize()'s entries plus what this benchmark also reports: noisy share, run time, FLIP's speed."""
    for name, entry in summary.items():
        results = found[name]
        entry["noisy_share"] = collect_stat(results, ("noisy_share",))
        entry["seconds"] = collect_stat(results, ("seconds",))
        entry["flip"] = results[0].get("flip")
    return summary


def table_line(name: str, e: dict[str, Any]) -> str:
    """One row of a section's table."""
    pairs = sum(e["train_pairs"].values()) if e.get("train_pairs") else None
    noisy = e.get("noisy_share")
    cells = [str(pairs) if pairs is not None else "-",
             fmt({k: v * 100 if k != "n" else v for k, v in noisy.items()}) if noisy else "0"]
    cells += [fmt(e["test"].get(lang, {}).get(d)) for lang, d in
              (("en", "i2t"), ("en", "t2i"), ("sw", "i2t"), ("sw", "t2i"), ("yo", "i2t"))]
    cells += [fmt(e["zero_pair"]["i2t"]), fmt(e["zero_pair"]["t2i"]), fmt(e["train_split"].get("en", {}).get("i2t")),
              fmt(e["val_mean_recall"]), f"{e['seconds']['mean']:.0f}" if e.get("seconds") else "-",
              str(e["seconds"]["n"]) if e.get("seconds") else "-"]
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(summary: dict[str, Any], lrs: dict[str, float], quick: bool) -> str:
    """The tables, one per finding, with only the rows that have finished."""
    how = "quick: 60 steps; mean (min-max) over the seeds run" if quick else "mean (min-max) over seeds"
    lines = [f"# Scaling (Down) CLIP on builtin:emoji-cldr ({how})", "",
             "Test split = emoji no training step saw; R@1 in %; i2t / t2i. Pairs = training pairs after caps and "
             "curation; noisy % = share of them with a wrong image. Steps are fixed, so fewer pairs are seen more "
             "often. Rows are the demo recipe unless named otherwise (see `--list`).", ""]
    if lrs:
        lines += ["Learning rate per plan, chosen on validation mean recall: "
                  + ", ".join(f"{p} {lr:g}" for p, lr in sorted(lrs.items())), ""]
    for title, names in SECTIONS:
        present = [n for n in names if n in summary and summary[n]["test"]]
        if len(present) < 2:  # one row alone compares nothing
            continue
        lines += [title, "", HEAD, "|" + "---|" * 14, *(table_line(n, summary[n]) for n in present), ""]
    flip = summary.get("flip-speed", {}).get("flip")
    if flip:
        ratio = f"{flip['ratio']:g}"
        rates = flip["samples_per_s"]
        lines += [f"FLIP: {flip['model']} (random init), batch {flip['batch_size']}, {flip['threads']} thread(s): "
                  f"{rates['0']:.1f} samples/s at mask ratio 0, {rates[ratio]:.1f} at {ratio}, "
                  f"{flip['speedup']:.2f}x. The demo's EfficientNet tower has no patches to drop.", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any]) -> Any:
    """English test R@1 (image->text) against the share of pairs, and the noise and augmentation rows as bars."""
    import matplotlib.pyplot as plt  # write_report chose the Agg backend

    def en(name: str) -> dict[str, float] | None:
        e = summary.get(name)
        return e["test"]["en"]["i2t"] if e and e["test"].get("en") else None

    if not any(en(n) for _, names in SECTIONS for n in names):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for plan in ("lwa", "layernorm"):
        points = [(p, en(name)) for p, name in ((25, f"{plan}-25"), (50, f"{plan}-50"), (100, plan)) if en(name)]
        if points:
            x, s = zip(*points)
            spread = [[v["mean"] - v["min"] for v in s], [v["max"] - v["mean"] for v in s]]
            axes[0].errorbar(x, [v["mean"] for v in s], yerr=spread, fmt="o-", capsize=3, label=plan)
    axes[0].set_xlabel("% of the training pairs")
    axes[0].set_ylabel("test (unseen emoji) English R@1 image->text, %")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend()
    for ax, (title, names) in zip(axes[1:], SECTIONS[:2]):
        bars = [(n, en(n)) for n in names if en(n)]
        if bars:
            ax.bar(range(len(bars)), [s["mean"] for _, s in bars],
                   yerr=[[s["mean"] - s["min"] for _, s in bars], [s["max"] - s["mean"] for _, s in bars]],
                   capsize=3)
            ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=60, ha="right", fontsize=8)
        ax.set_title(title.lstrip("# ").split(" (")[0], fontsize=10)
    return fig


def report(out: Path, quick: bool, results: Path = RESULTS) -> str:
    """Write scaling_down{-quick}.json/.md/.png from the finished rows; return the Markdown."""
    found = load_results(out, quick)
    summary, lrs = extend(summarize(found), found), chosen_lrs(found)
    stem = results / ("scaling_down-quick" if quick else "scaling_down")
    return write_report(stem, summary, lrs, markdown(summary, lrs, quick), plot)


def select(names: str | None, quick: bool) -> list[Row]:
    """Rows named (or in the groups named) by --rows, learning-rate rows first; --quick's default set."""
    every = rows()
    return select_rows(every, names, QUICK if quick else [r.name for r in every], "scaling_down.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0].strip('"'))
    parser.add_argument("--quick", action="store_true", help="60 steps, seed 0, 6 noise rows (about 20 minutes)")
    parser.add_argument("--rows", help="comma-separated row names or groups (lr, base, noise, aug, slip, size)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--out", type=Path, default=ROW_DIR, help="where finished rows are kept")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the tables and plot are written")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plot")
    parser.add_argument("--list", action="store_true", help="list the rows")
    parser.add_argument("--smoke-towers", nargs=2, metavar=("VISION", "TEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for r in rows():
            print(f"{r.group:6s} {r.name:28s} {r.kind:6s} {' '.join(r.overrides)}  {r.note}")
        return 0
    if args.smoke_towers and (args.out == ROW_DIR or args.results == RESULTS):
        raise SystemExit("scaling_down.py: a smoke run measures nothing; give it its own --out and --results.")
    if not args.report:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if args.smoke_towers:
            def make() -> ScalingBench:
                return smoke_bench(args.quick, args.out, args.smoke_towers)
        else:
            def make() -> ScalingBench:
                return ScalingBench(args.quick, args.out)
        run_rows(select(args.rows, args.quick), seeds, args.quick, args.out, make, "scaling_down",
                 lrs=lambda: chosen_lrs(load_results(args.out, args.quick)))
    print(report(args.out, args.quick, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
