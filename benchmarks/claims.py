"""LilT's claims on the project's own data: PEFT vs full, budgets, knowledge conservation, generalization levers.

Every row trains (or fits) on the Noto renders of builtin:emoji-cldr's training split and is scored on
the **test split: emoji no step saw** (R@1 both ways per language, and the mean over languages with no
training pairs), on a same-size sample of **training** emoji (the memorization gap), and on the text
tower's own cross-lingual retrieval (English name -> name in language X of the same test emoji; does
tuning keep what the multilingual tower knew?). Choices (each plan's learning rate, lever strengths)
are read from the validation split only: `lr` rows score validation, and method rows use the best.

Rows are resumable: each finished (row, seed) is a JSON file under benchmarks/results/claims/, and a rerun
skips it. `--rows` runs a part (names or groups), `--quick` a 20-minute version (fewer steps, one seed).

    python benchmarks/claims.py --quick                 # ridge, heads, lwa, lwa+parallel; prints the table
    python benchmarks/claims.py --rows method,budget    # groups or row names, 3 seeds each
    python benchmarks/claims.py --report                # tables and plot from what is on disk
    python benchmarks/claims.py --list                  # the rows
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import (CONSERVE_LANGS, EVAL_LANGS, RESULTS, SEEDS, ZERO_PAIR, Bench, Row,  # noqa: E402,F401
                               fmt, load_results, row_file, run_rows, select_rows, stat, summarize, write_report)

ROW_DIR = RESULTS / "claims"
EXTRA_LANGS = ["fr", "it", "pt", "nl", "ru", "ja", "ko", "ar", "hi", "tr"]  # never scored: training text only
# A plan whose best lr lands on the edge of its grid gets the next point beyond it (bitfit, layernorm, deep, full did).
LR_GRID = {"lwa": (3e-4, 1e-3, 3e-3), "layernorm": (3e-4, 1e-3, 3e-3, 1e-2), "bitfit": (3e-4, 1e-3, 3e-3, 1e-2),
           "lora": (3e-4, 1e-3, 3e-3), "deep": (3e-5, 1e-4, 3e-4, 1e-3), "lock-image": (1e-5, 3e-5, 1e-4),
           "full": (1e-5, 3e-5, 1e-4, 3e-4)}


def rows() -> list[Row]:
    """Every row of the benchmark."""
    out = [Row("ridge", "method", "ridge", note="closed-form ridge map on frozen features"),
           Row("heads", "method", "heads", note="heads fitted on frozen features (LP)")]
    plans = ("layernorm", "bitfit", "lora", "lwa", "deep", "lock-image", "full")
    out += [Row(plan, "method", plan=plan) for plan in plans]
    for plan, lrs in LR_GRID.items():
        out += [Row(f"lr-{plan}-{lr:g}", "lr", plan=plan, overrides=(f"train.lr={lr}",), val_only=True, seeds=(0,))
                for lr in lrs]
    for n in ("0", "50", "150", "300", "all"):
        cap = "null" if n == "all" else n
        budget_over = (f"data.pairs_per_lang={{sw: {cap}, yo: 150}}",) if n != "all" else \
            ("data.pairs_per_lang={yo: 150}",)
        out += [Row(f"budget-ridge-sw{n}", "budget", "ridge", overrides=budget_over),
                Row(f"budget-lwa-sw{n}", "budget", plan="lwa", overrides=budget_over),
                Row(f"budget-full-sw{n}", "budget", plan="full", overrides=budget_over)]
    # The demo recipe names the parallel text for its translation maps with the training term off; these
    # rows turn the term on (weight 1) unless they say otherwise.
    parallel = ("data.parallel=builtin:emoji-cldr", "data.parallel_langs=[sw, yo]", "train.parallel_weight=1")
    out += [
        Row("ridge+hubness", "lever", "ridge", hubness=True,
            note="CSLS hubness correction (per-language caption banks), k and beta on validation"),
        Row("lwa+hubness", "lever", plan="lwa", hubness=True, note="the same correction on the tuned model"),
        Row("lwa+ridge-ensemble", "lever", plan="lwa", ensemble=True,
            note="scores mixed with the ridge map's on frozen features, weight on validation"),
        Row("lwa+parallel+ridge-ensemble", "lever", plan="lwa", overrides=parallel, ensemble=True,
            note="parallel text, scored mixed with the ridge map"),
        Row("ridge+translate", "lever", "ridge", overrides=parallel, translate=True,
            note="captions translated by per-language ridge maps fitted on the parallel text (lilt.eval.translate)"),
        Row("ridge+translate-all", "lever", "ridge", translate=True,
            overrides=("data.parallel=builtin:emoji-cldr", f"data.parallel_langs=[sw, yo, {', '.join(ZERO_PAIR)}]"),
            note="parallel text (and maps) for the zero-pair languages too: they get text pairs, still no image"),
        Row("lwa+translate", "lever", plan="lwa", overrides=(*parallel, "train.parallel_weight=0"), translate=True,
            note="the same maps on the tuned model; the parallel text used only for them"),
        Row("lwa+parallel+translate", "lever", plan="lwa", overrides=parallel, translate=True,
            note="the text-to-text term in training, and the maps"),
        Row("lwa+translate+ridge-ensemble", "lever", plan="lwa", overrides=(*parallel, "train.parallel_weight=0"),
            translate=True, ensemble=True, note="maps on both sides of the ridge ensemble"),
        Row("ridge+translate+hubness", "lever", "ridge", overrides=parallel, translate=True, hubness=True,
            note="the ridge map with the demo's scoring levers: its maps, then CSLS on the mapped scores"),
        Row("lwa+translate+ridge-ensemble+hubness", "lever", plan="lwa",
            overrides=(*parallel, "train.parallel_weight=0"), translate=True, ensemble=True, hubness=True,
            note="the demo's scores, then CSLS against its own training-split scores"),
        Row("ridge-stages", "lever", "ridge", ridge_features="stages",
            note="the ridge map on multi-scale frozen image features: pooled plus each vision block's pooled output"),
        Row("ridge-stages+translate+hubness", "lever", "ridge", overrides=parallel, translate=True, hubness=True,
            ridge_features="stages", note="the best frozen-features-only scorer: that map, its maps, CSLS"),
        Row("lwa+translate+ridge-stages-ensemble+hubness", "lever", plan="lwa",
            overrides=(*parallel, "train.parallel_weight=0"), translate=True, ensemble=True, hubness=True,
            ridge_features="stages", note="the demo recipe: the ensemble's ridge side on multi-scale features"),
        Row("kridge-stages", "lever", "ridge", ridge_features="stages", ridge_kernel="rbf",
            note="kernel (RBF) ridge on the multi-scale features, alpha and width on validation"),
        Row("kridge-stages+translate+hubness", "lever", "ridge", overrides=parallel, translate=True, hubness=True,
            ridge_features="stages", ridge_kernel="rbf", note="the kernel map with its maps and CSLS (no training)"),
        Row("lwa+translate+kridge-stages-ensemble+hubness", "lever", plan="lwa",
            overrides=(*parallel, "train.parallel_weight=0"), translate=True, ensemble=True, hubness=True,
            ridge_features="stages", ridge_kernel="rbf", note="the demo recipe with the kernel map as the ridge side"),
        Row("kridge-2way-stages", "lever", "ridge", ridge_features="stages", ridge_kernel="rbf-two-way",
            note="the kernel map and its reverse, captions -> image features (Shigeto et al. 2015), mixed"),
        Row("kridge-2way-stages+translate+hubness", "lever", "ridge", overrides=parallel, translate=True, hubness=True,
            ridge_features="stages", ridge_kernel="rbf-two-way", note="the two-way map with its maps and CSLS"),
        Row("lwa+translate+kridge-2way-stages-ensemble+hubness", "lever", plan="lwa",
            overrides=(*parallel, "train.parallel_weight=0"), translate=True, ensemble=True, hubness=True,
            ridge_features="stages", ridge_kernel="rbf-two-way", note="the demo recipe, the two-way map its side"),
        Row("lwa+translate+kridge-2way-tuned-ensemble+hubness", "lever", plan="lwa",
            overrides=(*parallel, "train.parallel_weight=0"), translate=True, ensemble=True, hubness=True,
            ridge_features="stages", ridge_kernel="rbf-two-way", ridge_towers="tuned",
            note="the demo recipe with the two-way map fitted on the tuned towers' features"),
        Row("lwa+parallel+translate+ridge-ensemble", "lever", plan="lwa", overrides=parallel, translate=True,
            ensemble=True, note="the text-to-text term, the maps, the ensemble"),
        Row("lwa+bf16", "lever", plan="lwa", overrides=("train.mixed_precision=bf16",),
            note="bf16 autocast (speed: benchmarks/speed.py's *-bf16 rows); does accuracy hold?"),
        Row("lwa+bf16-fw", "lever", plan="lwa", overrides=("train.mixed_precision=bf16", "train.frozen_dtype=bfloat16"),
            note="bf16 autocast, frozen weights stored in bf16 (speed: *-bf16-fw rows); does accuracy hold?"),
        Row("lwa+ridge-init", "lever", plan="lwa", overrides=("train.head_init=ridge",),
            note="heads start from the ridge solution"),
        # Its own evaluation interval: --quick turns evaluation during training off, and with only the final
        # evaluation to choose from, keep_best would be lwa again.
        Row("lwa+keep-best", "lever", plan="lwa", overrides=("train.keep_best=true", "train.eval_every=10"),
            note="best validation checkpoint (validation every 10 steps)"),
        Row("lwa+wise", "lever", plan="lwa", overrides=("train.wise_alphas=[0.0, 0.25, 0.5, 0.75, 1.0]",),
            note="WiSE-FT, alpha on validation"),
        Row("lwa+parallel", "lever", plan="lwa", overrides=parallel,
            note="en-sw/yo names of training emoji, text-to-text term"),
        Row("lwa+parallel-w3", "lever", plan="lwa", overrides=(*parallel, "train.parallel_weight=3"),
            note="the same, 3x the weight of the text-to-text term"),
        Row("lwa+multilingual", "lever", plan="lwa",
            overrides=(f"data.langs=[en, sw, yo, {', '.join(EXTRA_LANGS)}]",),
            note=f"names of the training emoji in {len(EXTRA_LANGS)} more languages as extra positives"),
        Row("lwa+balanced", "lever", plan="lwa", overrides=("data.lang_sampling=0.3",),
            note="language-balanced sampling, p_l ~ n_l^0.3 (XLM-R)"),
        Row("lwa+multilingual+balanced", "lever", plan="lwa",
            overrides=(f"data.langs=[en, sw, yo, {', '.join(EXTRA_LANGS)}]", "data.lang_sampling=0.3"),
            note="the same, languages drawn with p_l ~ n_l^0.3"),
        Row("lwa+parallel+wise", "lever", plan="lwa",
            overrides=(*parallel, "train.wise_alphas=[0.0, 0.25, 0.5, 0.75, 1.0]"),
            note="the two levers that won on validation, together"),
        Row("lwa+keywords", "lever", plan="lwa", overrides=("data.options={keywords: true}",),
            note="CLDR keywords as extra captions"),
        Row("lwa+crop", "lever", plan="lwa", overrides=("data.augment=crop",),
            note="crops without the demo's flips (a mirrored 'left arrow' is a wrong caption)"),
        Row("lwa+style", "lever", plan="lwa", overrides=("data.augment=style",),
            note="drawing-style augmentation: strokes, edges, blur, posterize, light colour; no flip or hue"),
        Row("lwa+randaugment", "lever", plan="lwa", overrides=("data.augment=randaugment",),
            note="timm RandAugment m9 n2 (flips, colour inversions)"),
        Row("budget-lwa+ridge-ensemble-sw300", "budget", plan="lwa", ensemble=True,
            overrides=("data.pairs_per_lang={sw: 300, yo: 150}",),
            note="the ensemble on 300 sw image pairs, no parallel text (the bar for 150 pairs + parallel text)"),
        Row("budget-demo-sw300", "budget", plan="lwa", ensemble=True, hubness=True, ridge_features="stages",
            ridge_kernel="rbf-two-way", ridge_towers="tuned", overrides=("data.pairs_per_lang={sw: 300, yo: 150}",),
            note="the demo recipe on 300 sw image pairs without parallel text (no translation maps)"),
        Row("lwa+sw150+parallel", "budget", plan="lwa",
            overrides=("data.pairs_per_lang={sw: 150, yo: 150}", *parallel), note="150 sw image pairs + parallel"),
    ]
    return out


def chosen_lrs(found: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each plan's learning rate with the best validation mean recall among its finished lr rows."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows():
        if row.group == "lr" and row.name in found:
            score = statistics.mean(r["val"]["mean_recall"] for r in found[row.name])
            lr = float(row.overrides[0].split("=")[1])
            if row.plan not in best or score > best[row.plan][0]:
                best[row.plan] = (score, lr)
    return {plan: lr for plan, (_, lr) in best.items()}


def chosen_levers(seeds: list[dict[str, Any]]) -> str:
    """What validation chose for a row's scoring-time levers, over its seeds, in a few words."""
    parts = []
    if any("hubness_k" in lv for lv in seeds):
        parts.append(", ".join(f"k {lv['hubness_k']} beta {lv['hubness_beta']:g}" for lv in seeds if "hubness_k" in lv))
    for key, what in (("translation", "maps"), ("ridge_translation", "ridge-side maps")):
        maps = [lv[key] for lv in seeds if key in lv]
        if maps:  # mean strength per language over the seeds (alpha varies; it is in the JSON)
            langs = sorted(maps[0])
            parts.append(f"{what} strength " + " ".join(
                f"{lang} {statistics.mean(m[lang]['strength'] for m in maps):.2g}" for lang in langs))
    if any("ensemble_weight" in lv for lv in seeds):
        parts.append("w " + ", ".join(f"{lv['ensemble_weight']:g}" for lv in seeds if "ensemble_weight" in lv))
        if any("hubness_k" in lv and "joint_val" not in lv for lv in seeds):  # measured before 4029c39
            parts.append("w chosen before the correction")
        elif any("joint_val" in lv for lv in seeds):
            parts.append("w, k, beta chosen together")
    return "; ".join(parts)


def markdown(summary: dict[str, Any], lrs: dict[str, float], quick: bool) -> str:
    """The claims tables."""
    how = "quick: 60 steps; mean (min-max) over the seeds each row has" if quick else "mean (min-max) over seeds"
    lines = [f"# LilT's claims on builtin:emoji-cldr ({how})",
             "", "Test split = emoji no training step saw; R@1 in %; i2t / t2i. `train-split en` scores as many "
             "training emoji as there are test emoji (the memorization gap). Zero-pair = mean over "
             f"{', '.join(ZERO_PAIR)}.", ""]
    if lrs:
        lines += ["Learning rate per plan, chosen on validation mean recall: "
                  + ", ".join(f"{p} {lr:g}" for p, lr in sorted(lrs.items())), ""]
    head = ("| row | % trainable | seeds | en i2t | en t2i | sw i2t | sw t2i | yo i2t | zero-pair i2t | "
            "zero-pair t2i | train-split en i2t | gap en i2t | val mean recall |")
    for group, title in (("method", "## Methods at equal data"), ("lever", "## Levers (on lwa)"),
                         ("budget", "## Budget: Swahili image pairs")):
        names = [r.name for r in rows() if r.group == group and r.name in summary]
        if group == "lever":
            names = [n for n in ("ridge", "heads", "lwa") if n in summary] + names
        if not names:
            continue
        lines += [title, "", head, "|" + "---|" * 13]
        for name in names:
            e = summary[name]
            gap = None
            if e["train_split"].get("en") and e["test"].get("en") and e["train_split"]["en"]["i2t"]:
                gap = {"mean": e["train_split"]["en"]["i2t"]["mean"] - e["test"]["en"]["i2t"]["mean"], "n": 1}
            cells = [f"{e['trainable_percent']:.2f}" if e["trainable_percent"] is not None else "-",
                     str(len(e["seeds"]))]
            cells += [fmt(e["test"].get(lang, {}).get(d)) for lang, d in (("en", "i2t"), ("en", "t2i"), ("sw", "i2t"),
                                                                          ("sw", "t2i"), ("yo", "i2t"))]
            cells += [fmt(e["zero_pair"]["i2t"]), fmt(e["zero_pair"]["t2i"]),
                      fmt(e["train_split"].get("en", {}).get("i2t")), fmt(gap), fmt(e["val_mean_recall"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    corrected = [n for n in summary if summary[n].get("scoring_gain")]
    if corrected:
        keys = list(summary[corrected[0]]["scoring_gain"])
        lines += ["## Scoring-time levers: each seed's model scored without and with it (test R@1 gain, points)", "",
                  "| row | seeds | chosen on validation | " + " | ".join(keys) + " |",
                  "|" + "---|" * (3 + len(keys))]
        for name in corrected:
            e = summary[name]
            chosen = chosen_levers(e["levers"])
            lines.append(f"| {name} | {len(e['seeds'])} | {chosen} | "
                         + " | ".join(f"{e['scoring_gain'][k]['mean']:+.1f} ({e['scoring_gain'][k]['min']:+.1f}.."
                                      f"{e['scoring_gain'][k]['max']:+.1f})" for k in keys) + " |")
        lines.append("")
    conserved = [n for n in summary if summary[n]["group"] == "method" and summary[n]["conservation"].get("sw")]
    if conserved:
        lines += ["## Knowledge conservation: the text tower's English name -> name in X, test emoji, R@1 %", "",
                  "| row | " + " | ".join(CONSERVE_LANGS) + " |", "|" + "---|" * (1 + len(CONSERVE_LANGS))]
        for name in conserved:
            lines.append(f"| {name} | " + " | ".join(fmt(summary[name]["conservation"][x]) for x in CONSERVE_LANGS)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any]) -> Any:
    """Test R@1 against % trainable (LilT's figure 1), and the Swahili budget curve."""
    import matplotlib.pyplot as plt  # write_report chose the Agg backend

    methods = [r.name for r in rows() if r.group == "method" and r.name in summary and summary[r.name]["test"]]
    if not methods:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in methods:
        e = summary[name]
        x = max(e["trainable_percent"] or 0.0, 1e-3)
        s = e["test"]["en"]["i2t"]
        left.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="o", capsize=3)
        left.annotate(name, (x, s["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xscale("log")
    left.set_xlabel("% of parameters trained (ridge/heads: 0, drawn at 0.001)")
    left.set_ylabel("test (unseen emoji) English R@1 image->text, %")
    for plan in ("ridge", "lwa", "full"):
        points = []
        for n, x in (("0", 0), ("50", 50), ("150", 150), ("300", 300), ("all", 900)):
            # 150 is the demo's budget: the method row (3 seeds) is that point
            e = (summary.get(plan) if n == "150" else None) or summary.get(f"budget-{plan}-sw{n}")
            if e and e["test"].get("sw"):
                points.append((x, e["test"]["sw"]["i2t"]["mean"]))
        if points:
            right.plot(*zip(*points), "o-", label=plan)
    for name, x, marker, label in (("lwa+parallel", 150, "*", "lwa + parallel text (training term)"),
                                   ("lwa+translate+kridge-2way-tuned-ensemble+hubness", 150, "P",
                                    "the demo: two-way kernel map on the tuned towers + translation maps + CSLS"),
                                   ("budget-demo-sw300", 300, "D", "the demo without parallel text"),
                                   ("budget-lwa+ridge-ensemble-sw300", 300, "X", "lwa + ridge ensemble")):
        if summary.get(name) and summary[name]["test"].get("sw"):
            right.plot([x], [summary[name]["test"]["sw"]["i2t"]["mean"]], marker, ms=12, label=label)
    right.set_xlabel("Swahili image-caption pairs (all = every training emoji)")
    right.set_ylabel("test Swahili R@1 image->text, %")
    if right.get_legend_handles_labels()[0]:  # the budget rows may not have run yet
        right.legend(loc="lower right", fontsize=8)
    return fig


def report(out: Path, quick: bool, results: Path = RESULTS) -> str:
    """Write claims{-quick}.json/.md/.png from the finished rows; return the Markdown."""
    found = load_results(out, quick)
    summary, lrs = summarize(found), chosen_lrs(found)
    stem = results / ("claims-quick" if quick else "claims")
    return write_report(stem, summary, lrs, markdown(summary, lrs, quick), plot)


def select(names: str | None, quick: bool) -> list[Row]:
    """Rows named (or in the groups named) by --rows; --quick's default set."""
    every = rows()
    default = ["ridge", "heads", "lwa", "lwa+parallel"] if quick else [r.name for r in every]
    return select_rows(every, names, default, "claims.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, seed 0, four rows (about 15 minutes)")
    parser.add_argument("--rows", help="comma-separated row names or groups (method, lr, budget, lever)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--out", type=Path, default=ROW_DIR, help="where finished rows are kept")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plot")
    parser.add_argument("--list", action="store_true", help="list the rows")
    args = parser.parse_args(argv)
    if args.list:
        for r in rows():
            print(f"{r.group:7s} {r.name:24s} {r.kind:6s} {' '.join(r.overrides)}  {r.note}")
        return 0
    if not args.report:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        run_rows(select(args.rows, args.quick), seeds, args.quick, args.out, lambda: Bench(args.quick, args.out),
                 "claims", lrs=lambda: chosen_lrs(load_results(args.out, args.quick)))
    print(report(args.out, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
