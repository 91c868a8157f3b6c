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
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lilt.baselines import fit_ridge, ridge_retrieval  # noqa: E402
from lilt.config import DataConfig  # noqa: E402
from lilt.data.emoji_cldr import load_emoji_cldr  # noqa: E402
from lilt.data.resolve import resolve_data  # noqa: E402
from lilt.data.transforms import PairCollator  # noqa: E402
from lilt.data.loader import pair_loader  # noqa: E402
from lilt.eval.retrieval import EmbeddedPairs, evaluate_retrieval, image_keys, recall_at_k, retrieval_by_lang  # noqa
from lilt.model import DualEncoder  # noqa: E402
from lilt.plan import TuningPlan, apply_plan, budget  # noqa: E402
from lilt.recipe import Recipe  # noqa: E402
from lilt.training import train, warm_up_heads  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ROW_DIR = RESULTS / "claims"
DEMO = REPO / "recipes" / "demo.yaml"
METHODS = REPO / "recipes" / "methods"
EVAL_LANGS = ["en", "sw", "yo", "am", "ha", "mr", "de", "es", "zh"]
ZERO_PAIR = ["am", "ha", "mr", "de", "es", "zh"]
CONSERVE_LANGS = ["sw", "yo", "am", "ha", "mr", "de", "es", "zh", "fr", "ru", "ar", "hi"]
EXTRA_LANGS = ["fr", "it", "pt", "nl", "ru", "ja", "ko", "ar", "hi", "tr"]  # never scored: training text only
SEEDS = (0, 1, 2)
LR_GRID = {"lwa": (3e-4, 1e-3, 3e-3), "layernorm": (1e-3, 3e-3, 1e-2), "bitfit": (1e-3, 3e-3, 1e-2),
           "lora": (3e-4, 1e-3, 3e-3), "deep": (1e-4, 3e-4, 1e-3), "lock-image": (1e-5, 3e-5, 1e-4),
           "full": (1e-5, 3e-5, 1e-4)}


@dataclass
class Row:
    """One configuration: how it trains (or fits) and what it changes in the demo recipe."""

    name: str
    group: str
    kind: str = "train"  # ridge | heads | train
    plan: str | None = None  # a recipes/methods name; None keeps the demo's (lwa)
    overrides: tuple[str, ...] = ()
    note: str = ""
    val_only: bool = False  # an lr row: scored on validation only (it chooses, it is not reported)
    seeds: tuple[int, ...] = SEEDS


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
    parallel = ("data.parallel=builtin:emoji-cldr", "data.parallel_langs=[sw, yo]")
    out += [
        Row("lwa+ridge-init", "lever", plan="lwa", overrides=("train.head_init=ridge",),
            note="heads start from the ridge solution"),
        Row("lwa+keep-best", "lever", plan="lwa", overrides=("train.keep_best=true",),
            note="best validation checkpoint"),
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
        Row("lwa+sw150+parallel", "budget", plan="lwa",
            overrides=("data.pairs_per_lang={sw: 150, yo: 150}", *parallel), note="150 sw image pairs + parallel"),
    ]
    return out


# -- features of the frozen towers, computed once per process ------------------------------------------------
class FrozenFeatures:
    """Pooled features of the frozen towers by image path and by caption: ridge rows and head warm-ups share them."""

    def __init__(self, model: DualEncoder, batch_size: int = 256) -> None:
        self.model, self.batch_size = model, batch_size
        self.images: dict[str, torch.Tensor] = {}
        self.texts: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def of(self, data: Any) -> EmbeddedPairs:
        """EmbeddedPairs of features (not embeddings) for a pair table, computing only what is new."""
        self.model.eval()
        keys = [str(k) for k in image_keys(data)]
        new = sorted({k for k in keys if k not in self.images})
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            table = data.select([first[k] for k in new])
            collate = PairCollator(self.model.image_transform(train=False), tokenize=None, extra_columns=())
            loader = pair_loader(table, collate, self.batch_size, shuffle=False, drop_last=False)
            done = 0
            for batch in loader:
                feats = self.model.image_features(batch["pixel_values"]).float()
                for i, row in enumerate(batch["rows"].tolist()):
                    self.images[new[row]] = feats[i]
                done += len(feats)
        texts = list(data["text"])
        todo = sorted({t for t in texts if t not in self.texts})
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            feats = self.model.text_features(self.model.tokenize(chunk)).float()
            self.texts.update(zip(chunk, feats))
        order = list(dict.fromkeys(keys))
        index = {k: i for i, k in enumerate(order)}
        return EmbeddedPairs(torch.stack([self.images[k] for k in order]), torch.stack([self.texts[t] for t in texts]),
                             torch.tensor([index[k] for k in keys]), list(data["lang"]), [])


def head_retrieval(model: DualEncoder, features: EmbeddedPairs) -> dict[str, Any]:
    """Retrieval through the model's heads on frozen features (the heads row)."""
    with torch.inference_mode():
        images = F.normalize(model.vision_proj(features.images), dim=-1)
        texts = F.normalize(model.text_proj(features.texts), dim=-1)
    return retrieval_by_lang(EmbeddedPairs(images, texts, features.text_image, features.langs, []))


# -- one row ------------------------------------------------------------------------------------------------
class Bench:
    """Shared state of one benchmark process: the base recipe, the evaluation tables, the feature cache."""

    def __init__(self, quick: bool, out: Path) -> None:
        self.quick, self.out = quick, out
        self.base = ["train.report_to=[]", "train.save_every=0", "train.log_every=50", "data.num_workers=2"]
        if quick:
            self.base += ["train.steps=60", "train.warmup_steps=6", "train.eval_every=0"]
        spec = Recipe.from_file(DEMO, self.base)
        torch.manual_seed(0)
        self.frozen = FrozenFeatures(DualEncoder(spec.model))
        test_config = DataConfig.from_dict({**spec.data.to_dict(), "split": "test", "pairs_per_lang": None,
                                            "langs": EVAL_LANGS})
        self.test, _, _ = resolve_data(None, test_config, 0)
        _, self.val, _ = resolve_data(None, spec.data, 0)  # the demo's languages (en, sw, yo): lever choices
        n_test = len(set(self.test["emoji"]))
        train_en = load_emoji_cldr("train", langs=["en"])
        keep = torch.randperm(len(train_en), generator=torch.Generator().manual_seed(0))[:n_test].sort().values
        self.train_sample = train_en.select(keep.tolist())  # as many training emoji as test emoji: equal galleries
        self.conserve = load_emoji_cldr("test", langs=["en", *CONSERVE_LANGS])
        self.frozen_conservation = self.conservation(self.frozen.model)

    def recipe(self, row: Row, seed: int, lrs: dict[str, float]) -> Recipe:
        lr = [f"train.lr={lrs[row.plan]}"] if row.plan in lrs and not any("train.lr" in o for o in row.overrides) \
            else []
        spec = Recipe.from_file(DEMO, [*self.base, *lr, *row.overrides, f"train.seed={seed}",
                                       f"eval.langs=[{', '.join(EVAL_LANGS)}]"])
        if row.plan is not None:
            spec = dataclasses.replace(spec, plan=TuningPlan.from_recipe(METHODS / f"{row.plan}.yaml"))
        return spec

    def run(self, row: Row, seed: int, lrs: dict[str, float]) -> dict[str, Any]:
        start = time.perf_counter()
        spec = self.recipe(row, seed, lrs)
        train_data, _, _ = resolve_data(None, spec.data, seed)
        val_data = self.val  # the same validation captions for every row, whatever languages it trains on
        result: dict[str, Any] = {"row": row.name, "group": row.group, "seed": seed, "quick": self.quick,
                                  "train_pairs": {k: int(v) for k, v in zip(*_counts(train_data["lang"]))}}
        if row.kind == "ridge":
            ridge = fit_ridge(self.frozen.of(train_data), val=self.frozen.of(val_data))
            result.update(trainable_percent=0.0, val=ridge_retrieval(ridge, self.frozen.of(val_data))["all"],
                          test=_r1(ridge_retrieval(ridge, self.frozen.of(self.test))),
                          train_split=_r1(ridge_retrieval(ridge, self.frozen.of(self.train_sample))),
                          conservation=self.frozen_conservation, ridge_alpha=ridge.alpha)
            return _finish(result, start)
        torch.manual_seed(seed)
        model = DualEncoder(spec.model)
        apply_plan(model, spec.plan)
        result["trainable_percent"] = budget(model).percent
        config = spec.train
        train_features = self.frozen.of(train_data)
        val_features = self.frozen.of(val_data)
        warm_up_heads(model, train_data, config, progress=False, features=train_features, val=val_features)
        if row.kind == "heads":  # only the heads and the temperature trained
            heads = sum(p.numel() for n, p in model.named_parameters()
                        if n.split(".")[0] in ("vision_proj", "text_proj", "logit_scale"))
            result["trainable_percent"] = 100.0 * heads / sum(p.numel() for p in model.parameters())
            result.update(val=head_retrieval(model, val_features)["all"],
                          test=_r1(head_retrieval(model, self.frozen.of(self.test))),
                          train_split=_r1(head_retrieval(model, self.frozen.of(self.train_sample))),
                          conservation=self.frozen_conservation)
            return _finish(result, start)
        config = dataclasses.replace(config, head_warmup_epochs=0, head_init="random")  # done above, on the cache
        with tempfile.TemporaryDirectory() as tmp:
            config = dataclasses.replace(config, output_dir=tmp)
            run = train(model, train_data, config, data_config=spec.data, val_data=val_data)
        result["val"] = {k.split("/", 2)[2]: v for k, v in run.metrics.items() if k.startswith("val/all/")}
        result["levers"] = {k: v for k, v in run.metrics.items() if k in ("wise_alpha", "best_step")}
        if row.val_only:
            return _finish(result, start)
        workers = {"batch_size": config.eval_batch_size, "num_workers": spec.data.num_workers}
        result["test"] = _r1(evaluate_retrieval(model, self.test, **workers))
        result["train_split"] = _r1(evaluate_retrieval(model, self.train_sample, **workers))
        result["conservation"] = self.conservation(model)
        return _finish(result, start)

    @torch.inference_mode()
    def conservation(self, model: DualEncoder) -> dict[str, float]:
        """R@1 (%) of English name -> name in language X among the test emoji, on the text tower's own features."""
        was = model.training
        model.eval()
        texts, langs, emoji = list(self.conserve["text"]), list(self.conserve["lang"]), list(self.conserve["emoji"])
        feats = torch.cat([model.text_features(model.tokenize(texts[s:s + 256])).float()
                           for s in range(0, len(texts), 256)])
        feats = F.normalize(feats, dim=-1)
        model.train(was)
        english = {e: i for i, (e, lang) in enumerate(zip(emoji, langs)) if lang == "en"}
        out = {}
        for lang in CONSERVE_LANGS:
            rows = [i for i, (e, x) in enumerate(zip(emoji, langs)) if x == lang and e in english]
            names = sorted({emoji[i] for i in rows})
            anchors = feats[[english[e] for e in names]]
            target = torch.tensor([names.index(emoji[i]) for i in rows])
            out[lang] = recall_at_k(anchors, feats[rows], target, (1,))["i2t/R@1"]
        return out


def _counts(langs: Iterable[str]) -> tuple[list[str], list[int]]:
    values: dict[str, int] = {}
    for lang in langs:
        values[lang] = values.get(lang, 0) + 1
    return list(values), list(values.values())


def _r1(by_lang: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {lang: {"i2t": v["i2t/R@1"], "t2i": v["t2i/R@1"]} for lang, v in by_lang.items()}


def _finish(result: dict[str, Any], start: float) -> dict[str, Any]:
    test = result.get("test")
    if test:
        result["zero_pair"] = {d: statistics.mean(test[x][d] for x in ZERO_PAIR if x in test) for d in ("i2t", "t2i")}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# -- results on disk ----------------------------------------------------------------------------------------
def row_file(out: Path, row: str, seed: int, quick: bool) -> Path:
    """Where a finished (row, seed) lives."""
    return out / ("quick" if quick else "full") / row / f"seed{seed}.json"


def load_results(out: Path, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Finished rows on disk: name -> one result per seed."""
    found: dict[str, list[dict[str, Any]]] = {}
    for file in sorted((out / ("quick" if quick else "full")).glob("*/seed*.json")):
        result = json.loads(file.read_text())
        found.setdefault(result["row"], []).append(result)
    return found


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


def stat(values: list[float]) -> dict[str, float]:
    """Mean, min, max over seeds."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(found: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row: mean and range over seeds of every reported number."""
    out = {}
    for name, results in found.items():
        def collect(path: tuple[str, ...]) -> dict[str, float] | None:
            values = []
            for r in results:
                value: Any = r
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    values.append(float(value))
            return stat(values) if values else None

        entry: dict[str, Any] = {"group": results[0]["group"], "seeds": sorted(r["seed"] for r in results),
                                 "trainable_percent": results[0].get("trainable_percent"),
                                 "val_mean_recall": collect(("val", "mean_recall"))}
        for split in ("test", "train_split"):
            entry[split] = {lang: {d: collect((split, lang, d)) for d in ("i2t", "t2i")}
                            for lang in (results[0].get(split) or {})}
        entry["zero_pair"] = {d: collect(("zero_pair", d)) for d in ("i2t", "t2i")}
        entry["conservation"] = {lang: collect(("conservation", lang)) for lang in CONSERVE_LANGS}
        entry["train_pairs"] = results[0].get("train_pairs")
        entry["levers"] = [r.get("levers") for r in results if r.get("levers")]
        out[name] = entry
    return out


def fmt(s: dict[str, float] | None) -> str:
    """'mean (min-max)' or the mean alone for one seed."""
    if not s:
        return "-"
    return f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def markdown(summary: dict[str, Any], lrs: dict[str, float], quick: bool) -> str:
    """The claims tables."""
    how = "quick: 60 steps, 1 seed" if quick else "mean (min-max) over seeds"
    lines = [f"# LilT's claims on builtin:emoji-cldr ({how})",
             "", "Test split = emoji no training step saw; R@1 in %; i2t / t2i. `train-split en` scores as many "
             "training emoji as there are test emoji (the memorization gap). Zero-pair = mean over "
             f"{', '.join(ZERO_PAIR)}.", ""]
    if lrs:
        lines += ["Learning rate per plan, chosen on validation mean recall: "
                  + ", ".join(f"{p} {lr:g}" for p, lr in sorted(lrs.items())), ""]
    head = ("| row | % trainable | en i2t | en t2i | sw i2t | sw t2i | yo i2t | zero-pair i2t | zero-pair t2i | "
            "train-split en i2t | gap en i2t | val mean recall |")
    for group, title in (("method", "## Methods at equal data"), ("lever", "## Levers (on lwa)"),
                         ("budget", "## Budget: Swahili image pairs")):
        names = [r.name for r in rows() if r.group == group and r.name in summary]
        if group == "lever":
            names = [n for n in ("ridge", "heads", "lwa") if n in summary] + names
        if not names:
            continue
        lines += [title, "", head, "|" + "---|" * 12]
        for name in names:
            e = summary[name]
            gap = None
            if e["train_split"].get("en") and e["test"].get("en") and e["train_split"]["en"]["i2t"]:
                gap = {"mean": e["train_split"]["en"]["i2t"]["mean"] - e["test"]["en"]["i2t"]["mean"], "n": 1}
            cells = [f"{e['trainable_percent']:.2f}" if e["trainable_percent"] is not None else "-"]
            cells += [fmt(e["test"].get(lang, {}).get(d)) for lang, d in (("en", "i2t"), ("en", "t2i"), ("sw", "i2t"),
                                                                          ("sw", "t2i"), ("yo", "i2t"))]
            cells += [fmt(e["zero_pair"]["i2t"]), fmt(e["zero_pair"]["t2i"]),
                      fmt(e["train_split"].get("en", {}).get("i2t")), fmt(gap), fmt(e["val_mean_recall"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
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


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Test R@1 against % trainable (LilT's figure 1), and the Swahili budget curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            e = summary.get(f"budget-{plan}-sw{n}")
            if e and e["test"].get("sw"):
                points.append((x, e["test"]["sw"]["i2t"]["mean"]))
        if points:
            right.plot(*zip(*points), "o-", label=plan)
    if summary.get("lwa+sw150+parallel") and summary["lwa+sw150+parallel"]["test"].get("sw"):
        right.plot([150], [summary["lwa+sw150+parallel"]["test"]["sw"]["i2t"]["mean"]], "*", ms=14,
                   label="lwa + parallel text")
    right.set_xlabel("Swahili image-caption pairs (all = every training emoji)")
    right.set_ylabel("test Swahili R@1 image->text, %")
    if right.get_legend_handles_labels()[0]:  # the budget rows may not have run yet
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path, quick: bool, results: Path = RESULTS) -> str:
    """Write claims{-quick}.json/.md/.png from the finished rows; return the Markdown."""
    found = load_results(out, quick)
    summary, lrs = summarize(found), chosen_lrs(found)
    stem = results / ("claims-quick" if quick else "claims")
    stem.with_suffix(".json").write_text(json.dumps({"lrs": lrs, "rows": summary}, indent=1) + "\n")
    text = markdown(summary, lrs, quick)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(summary, stem.with_suffix(".png"))
    return text


def select(names: str | None, quick: bool) -> list[Row]:
    """Rows named (or in the groups named) by --rows; --quick's default set."""
    every = rows()
    if names is None:
        wanted = ["ridge", "heads", "lwa", "lwa+parallel"] if quick else [r.name for r in every]
    else:
        asked = [x.strip() for x in names.split(",") if x.strip()]
        known = {r.name for r in every} | {r.group for r in every}
        unknown = [x for x in asked if x not in known]
        if unknown:
            raise SystemExit(f"claims.py: unknown rows or groups {unknown}; see --list.")
        wanted = [r.name for r in every if r.name in asked or r.group in asked]
    lr_first = sorted((r for r in every if r.name in wanted), key=lambda r: r.group != "lr")  # choices before use
    return lr_first


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
        todo = select(args.rows, args.quick)
        bench = None
        for row in todo:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else (
                [0] if args.quick else list(row.seeds))
            for seed in seeds:
                file = row_file(args.out, row.name, seed, args.quick)
                if file.is_file():
                    continue
                bench = bench or Bench(args.quick, args.out)
                lrs = chosen_lrs(load_results(args.out, args.quick))
                print(f"claims: {row.name} seed {seed} ...", flush=True)
                result = bench.run(row, seed, lrs)
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1) + "\n")
                os.replace(tmp, file)  # a killed run leaves no half-written row
                test = result.get("test", {}).get("en")
                said = f"test en R@1 {test['i2t']:.1f} / {test['t2i']:.1f}" if test else f"val {result['val']}"
                print(f"    done in {result['seconds']:.0f} s: {said}", flush=True)
    print(report(args.out, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
