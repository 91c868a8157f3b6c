"""What the benchmarks that train on builtin:emoji-cldr share: rows, the evaluation, results on disk.

A `Row` changes the demo recipe; `Bench` trains (or fits) it on the Noto renders of the training split and
scores the **test split: emoji no step saw** (R@1 both ways per language, the mean over languages with no
training pairs), as many **training** emoji (the memorization gap) and the text tower's own cross-lingual
retrieval. Each finished (row, seed) is a JSON file (`row_file`), so a rerun skips it (`run_rows`);
`summarize` gives the mean and min-max over seeds. `benchmarks/claims.py` and `benchmarks/scaling_down.py`
are built from these pieces.
"""

from __future__ import annotations

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
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lilt.baselines import fit_ridge, map_choices, pooled_part, ridge_pairs, ridge_retrieval  # noqa: E402
from lilt.config import DataConfig  # noqa: E402
from lilt.data.emoji_cldr import load_emoji_cldr  # noqa: E402
from lilt.data.resolve import resolve_data  # noqa: E402
from lilt.data.transforms import PairCollator  # noqa: E402
from lilt.data.loader import pair_loader  # noqa: E402
from lilt.eval.ensemble import choose_weight, choose_weight_and_hubness, mix_pairs  # noqa: E402
from lilt.eval.hubness import HubnessBank, choose_hubness  # noqa: E402
from lilt.eval.translate import TranslationMaps, choose_translation, embed_parallel  # noqa: E402
from lilt.data.parallel import parallel_of  # noqa: E402
from lilt.eval.retrieval import (EmbeddedPairs, embed_pairs, evaluate_retrieval, image_keys, recall_at_k,  # noqa: E402
                                 retrieval_by_lang)
from lilt.model import DualEncoder  # noqa: E402
from lilt.plan import TuningPlan, apply_plan, budget  # noqa: E402
from lilt.recipe import Recipe  # noqa: E402
from lilt.training import reset_accelerate_state, train, warm_up_heads  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "recipes" / "demo.yaml"
METHODS = REPO / "recipes" / "methods"
EVAL_LANGS = ["en", "sw", "yo", "am", "ha", "mr", "de", "es", "zh"]
ZERO_PAIR = ["am", "ha", "mr", "de", "es", "zh"]
CONSERVE_LANGS = ["sw", "yo", "am", "ha", "mr", "de", "es", "zh", "fr", "ru", "ar", "hi"]
SEEDS = (0, 1, 2)


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
    hubness: bool = False  # score with the CSLS correction, k and beta chosen on validation (lilt.eval.hubness)
    ensemble: bool = False  # score with the tuned model's cosine mixed with the ridge map's, weight on validation
    translate: bool = False  # translate captions with maps fitted on data.parallel, chosen on validation
    ridge_features: str = "pooled"  # what the ridge map (a ridge row, the ensemble's side) reads: pooled | stages
    ridge_kernel: str = "linear"  # that map's kind: linear | rbf | rbf-two-way (lilt.baselines.fit_ridge)
    ridge_towers: str = "frozen"  # the ensemble's map reads the frozen towers, or the tuned model's ('tuned')
    seeds: tuple[int, ...] = SEEDS


# -- features of the frozen towers, computed once per process ------------------------------------------------
class FrozenFeatures:
    """Features of the frozen towers by image path and by caption: ridge rows and head warm-ups share them.

    An image's entry is its multi-scale features (DualEncoder.image_stage_features); the pooled ones are
    their first `hidden_size` columns, so one pass serves both kinds of ridge row.
    """

    def __init__(self, model: DualEncoder, batch_size: int = 256) -> None:
        self.model, self.batch_size = model, batch_size
        self.images: dict[str, torch.Tensor] = {}
        self.texts: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def of(self, data: Any, stages: bool = False) -> EmbeddedPairs:
        """EmbeddedPairs of features (not embeddings) for a pair table, computing only what is new.

        `stages`: the images' multi-scale features instead of the pooled ones."""
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
                feats = self.model.image_stage_features(batch["pixel_values"]).float()
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
        pairs = EmbeddedPairs(torch.stack([self.images[k] for k in order]), torch.stack([self.texts[t] for t in texts]),
                              torch.tensor([index[k] for k in keys]), list(data["lang"]), [])
        return pairs if stages else pooled_part(pairs, self.model)


def head_retrieval(model: DualEncoder, features: EmbeddedPairs) -> dict[str, Any]:
    """Retrieval through the model's heads on frozen features (the heads row)."""
    with torch.inference_mode():
        images = F.normalize(model.vision_proj(features.images), dim=-1)
        texts = F.normalize(model.text_proj(features.texts), dim=-1)
    return retrieval_by_lang(EmbeddedPairs(images, texts, features.text_image, features.langs, []))


# -- one row ------------------------------------------------------------------------------------------------
class Bench:
    """Shared state of one benchmark process: the base recipe, the evaluation tables, the feature cache."""

    def __init__(self, quick: bool, out: Path, extra: Sequence[str] = ()) -> None:
        self.quick, self.out = quick, out
        self.base = ["train.report_to=[]", "train.save_every=0", "train.log_every=50", "data.num_workers=2"]
        if quick:
            self.base += ["train.steps=60", "train.warmup_steps=6", "train.eval_every=0"]
        self.base += list(extra)  # overrides of every row (e.g. tiny towers for a smoke test)
        spec = Recipe.from_file(DEMO, self.base)
        torch.manual_seed(0)
        self.frozen = FrozenFeatures(DualEncoder(spec.model))
        test_config = DataConfig.from_dict({**spec.data.to_dict(), "split": "test", "pairs_per_lang": None,
                                            "langs": EVAL_LANGS})
        self.test, _, _ = resolve_data(None, test_config, 0)
        _, self.val, _ = resolve_data(None, spec.data, 0)  # the demo's languages (en, sw, yo): lever choices
        self.vals: dict[tuple[str, ...], Any] = {}
        n_test = len(set(self.test["emoji"]))
        train_en = load_emoji_cldr("train", langs=["en"])
        keep = torch.randperm(len(train_en), generator=torch.Generator().manual_seed(0))[:n_test].sort().values
        self.train_sample = train_en.select(keep.tolist())  # as many training emoji as test emoji: equal galleries
        self.conserve = load_emoji_cldr("test", langs=["en", *CONSERVE_LANGS])
        self.frozen_conservation = self.conservation(self.frozen.model)

    def val_in(self, langs: Sequence[str]) -> Any:
        """Validation pairs in the demo's languages and `langs` (a translation map is chosen in its language)."""
        have = set(self.val["lang"])
        if set(langs) <= have:
            return self.val
        key = tuple(sorted(have | set(langs)))
        if key not in self.vals:
            spec = Recipe.from_file(DEMO, [*self.base, f"data.langs=[{', '.join(key)}]"])
            _, self.vals[key], _ = resolve_data(None, spec.data, 0)
        return self.vals[key]

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
        reset_accelerate_state()  # a bf16 row must not make the next row's mixed_precision 'auto' bf16
        spec = self.recipe(row, seed, lrs)
        train_data, _, _ = resolve_data(None, spec.data, seed)
        val_data = self.val  # the same validation captions for every row, whatever languages it trains on
        result: dict[str, Any] = {"row": row.name, "group": row.group, "seed": seed, "quick": self.quick,
                                  "train_pairs": {k: int(v) for k, v in zip(*_counts(train_data["lang"]))}}
        if "noisy" in train_data.column_names:  # builtin:emoji-cldr's noise option marks the re-paired captions
            result["noisy_share"] = float(sum(train_data["noisy"])) / max(len(train_data), 1)
        stages = row.ridge_features == "stages"
        if row.kind == "ridge":
            ridge = fit_ridge(self.frozen.of(train_data, stages), val=self.frozen.of(val_data, stages),
                              kernel=row.ridge_kernel)
            maps = self.ridge_translation(ridge, spec, result, stages) if row.translate else None

            def mapped(data: Any) -> EmbeddedPairs:
                pairs = ridge_pairs(ridge, self.frozen.of(data, stages))
                return maps.apply(pairs) if maps is not None else pairs

            bank = None
            if row.hubness:
                bank = self.choose_hubness(mapped(train_data), mapped(val_data), result)
            scored = (lambda pairs: bank.correct(pairs)) if bank is not None else (lambda pairs: pairs)
            if bank is not None or maps is not None:  # the same map's plain scores: a paired comparison
                result["test_uncorrected"] = _r1(ridge_retrieval(ridge, self.frozen.of(self.test, stages)))
            result.update(trainable_percent=0.0, val=retrieval_by_lang(scored(mapped(val_data)))["all"],
                          test=_r1(retrieval_by_lang(scored(mapped(self.test)))),
                          train_split=_r1(retrieval_by_lang(scored(mapped(self.train_sample)))),
                          conservation=self.frozen_conservation, **map_choices(ridge))
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
            # The table is already curated: `train` would curate the kept pairs again.
            data_config = dataclasses.replace(spec.data, curate=None)
            run = train(model, train_data, config, data_config=data_config, val_data=val_data)
        result["val"] = {k.split("/", 2)[2]: v for k, v in run.metrics.items() if k.startswith("val/all/")}
        result["levers"] = {k: v for k, v in run.metrics.items() if k in ("wise_alpha", "best_step")}
        if row.val_only:
            return _finish(result, start)
        workers = {"batch_size": config.eval_batch_size, "num_workers": spec.data.num_workers}
        bank = None
        if row.ensemble or row.translate:  # hubness, if asked, on the final (translated, mixed) scores
            self.ensemble(model, spec, train_data, val_data, result, workers, row)
        elif row.hubness:
            val_pairs = embed_pairs(model, val_data, **workers)
            bank = self.choose_hubness(embed_pairs(model, train_data, **workers), val_pairs, result)
            result["val"] = retrieval_by_lang(bank.correct(val_pairs))["all"]
            test_pairs = embed_pairs(model, self.test, **workers)
            result["test_uncorrected"] = _r1(retrieval_by_lang(test_pairs))
            result["test"] = _r1(retrieval_by_lang(bank.correct(test_pairs)))
        else:
            result["test"] = _r1(evaluate_retrieval(model, self.test, **workers))
        result["train_split"] = _r1(evaluate_retrieval(model, self.train_sample, **workers, hubness=bank))
        result["conservation"] = self.conservation(model)
        return _finish(result, start)

    def ensemble(self, model: DualEncoder, spec: Recipe, train_data: Any, val_data: Any, result: dict[str, Any],
                 workers: dict[str, Any], row: Row) -> None:
        """Scoring-time levers on a tuned model: translation maps (row.translate) and/or the output-space ensemble
        (1 - w) cos(tuned) + w cos(ridge map on frozen features) (row.ensemble), then the CSLS hubness correction
        of those scores against the training split's (row.hubness), chosen on validation in that order; the
        ensemble weight and the correction's k and beta are chosen together."""
        splits = {"val": val_data, "test": self.test, **({"train": train_data} if row.hubness else {})}
        tuned = {k: embed_pairs(model, d, **workers) for k, d in splits.items()}
        result["test_uncorrected"] = _r1(retrieval_by_lang(tuned["test"]))
        if row.translate:
            table = parallel_of(spec.data, spec.train.seed)
            choice = self.val_in(spec.data.parallel_targets())
            maps, tried = choose_translation(*embed_parallel(model, table, batch_size=workers["batch_size"]),
                                             tuned["val"] if choice is val_data else embed_pairs(model, choice,
                                                                                                 **workers))
            self.note_translation(maps, tried, result, "translation")
            tuned = {k: maps.apply(v) for k, v in tuned.items()}
        final, bank = tuned, None
        if row.ensemble:
            stages = row.ridge_features == "stages"
            towers = self.frozen if row.ridge_towers == "frozen" else FrozenFeatures(model)
            frozen = {name: towers.of(d, stages) for name, d in (("train", train_data), ("val", val_data),
                                                                 ("test", self.test))}
            ridge = fit_ridge(frozen["train"], val=frozen["val"], kernel=row.ridge_kernel)
            side = {k: ridge_pairs(ridge, frozen[k]) for k in tuned}
            if row.translate:
                maps = self.ridge_translation(ridge, spec, result, stages, towers)
                side = {k: maps.apply(v) for k, v in side.items()}
            levers = result.setdefault("levers", {})
            levers.update(**map_choices(ridge))
            if row.hubness:  # the weight and the correction's k and beta chosen together on validation
                w, bank, joint = choose_weight_and_hubness(tuned["train"], tuned["val"], side["train"], side["val"])
                levers.update(ensemble_weight=w, hubness_k=bank.k, hubness_beta=bank.beta, joint_val=joint)
            else:
                w, tried = choose_weight(tuned["val"], side["val"])
                levers.update(ensemble_weight=w,
                              ensemble_val={f"{x:g}": v["mean_recall"] for x, v in tried.items()})
            final = {k: mix_pairs(tuned[k], side[k], w) for k in tuned}
        if row.hubness:
            result["test_before_hubness"] = _r1(retrieval_by_lang(final["test"]))
            if bank is None:
                bank = self.choose_hubness(final["train"], final["val"], result)
            final = {k: bank.correct(v) for k, v in final.items()}
        result["val"] = retrieval_by_lang(final["val"])["all"]
        result["test"] = _r1(retrieval_by_lang(final["test"]))

    def ridge_translation(self, ridge: Any, spec: Recipe, result: dict[str, Any], stages: bool = False,
                          towers: FrozenFeatures | None = None) -> TranslationMaps:
        """Translation maps of data.parallel in the ridge map's text space, chosen on validation (noted in result).

        `towers`: the features the map reads (default: the frozen towers')."""
        towers = towers or self.frozen
        embedded = embed_parallel(towers.model, parallel_of(spec.data, spec.train.seed), features=True,
                                  transform=ridge.embed_texts)
        choice = self.val_in(spec.data.parallel_targets())
        maps, tried = choose_translation(*embedded, ridge_pairs(ridge, towers.of(choice, stages)))
        self.note_translation(maps, tried, result, "ridge_translation")
        return maps

    @staticmethod
    def note_translation(maps: TranslationMaps, tried: dict[str, Any], result: dict[str, Any], key: str) -> None:
        """Record the chosen alpha and strength per language."""
        result.setdefault("levers", {})[key] = {
            lang: {"alpha": maps.maps[lang].alpha, "strength": maps.strength[lang], "val": tried[lang]}
            for lang in maps.maps}

    @staticmethod
    def choose_hubness(train_pairs: EmbeddedPairs, val_pairs: EmbeddedPairs, result: dict[str, Any]) -> HubnessBank:
        """The CSLS bank of the row's training pairs at the k and beta that validation prefers (noted in result)."""
        bank, tried = choose_hubness(train_pairs, val_pairs)
        result.setdefault("levers", {}).update(hubness_k=bank.k, hubness_beta=bank.beta, hubness_val=tried)
        return bank

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


def stat(values: list[float]) -> dict[str, float]:
    """Mean, min, max over seeds."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def collect_stat(results: list[dict[str, Any]], path: tuple[str, ...]) -> dict[str, float] | None:
    """`stat` of the finite numbers at `path` (nested keys) in each seed's result; None when there are none."""
    values = []
    for r in results:
        value: Any = r
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return stat(values) if values else None


def summarize(found: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row: mean and range over seeds of every reported number."""
    out = {}
    for name, results in found.items():
        def collect(path: tuple[str, ...]) -> dict[str, float] | None:
            return collect_stat(results, path)

        entry: dict[str, Any] = {"group": results[0]["group"], "seeds": sorted(r["seed"] for r in results),
                                 "trainable_percent": results[0].get("trainable_percent"),
                                 "val_mean_recall": collect(("val", "mean_recall"))}
        for split in ("test", "train_split", "test_uncorrected"):
            entry[split] = {lang: {d: collect((split, lang, d)) for d in ("i2t", "t2i")}
                            for lang in (results[0].get(split) or {})}
        entry["zero_pair"] = {d: collect(("zero_pair", d)) for d in ("i2t", "t2i")}
        if all(r.get("test_uncorrected") for r in results):  # scoring-time levers: each seed's gain over its model
            paired = [{**{f"{x} {d}": r["test"][x][d] - r["test_uncorrected"][x][d] for x in ("en", "sw", "yo")
                          for d in ("i2t", "t2i")},
                       **{f"zero-pair {d}": statistics.mean(r["test"][x][d] - r["test_uncorrected"][x][d]
                                                            for x in ZERO_PAIR) for d in ("i2t", "t2i")}}
                      for r in results]
            entry["scoring_gain"] = {key: stat([p[key] for p in paired]) for key in paired[0]}
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


# -- choosing and running rows ------------------------------------------------------------------------------
def select_rows(every: list[Row], names: str | None, default: Sequence[str], script: str) -> list[Row]:
    """The rows named (or in the groups named) by a comma-separated `names`, else `default`: in `every`'s order,
    learning-rate rows first (the choices other rows read)."""
    if names is None:
        wanted = list(default)
    else:
        asked = [x.strip() for x in names.split(",") if x.strip()]
        known = {r.name for r in every} | {r.group for r in every}
        unknown = [x for x in asked if x not in known]
        if unknown:
            raise SystemExit(f"{script}: unknown rows or groups {unknown}; see --list.")
        wanted = [r.name for r in every if r.name in asked or r.group in asked]
    return sorted((r for r in every if r.name in wanted), key=lambda r: r.group != "lr")


def write_report(stem: Path, summary: dict[str, Any], lrs: dict[str, float], text: str,
                 plot: Callable[[dict[str, Any]], Any]) -> str:
    """Write STEM.json (lrs and rows), STEM.md (the Markdown) and STEM.png (`plot`'s figure, if it draws one);
    return the Markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"lrs": lrs, "rows": summary}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(summary)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
    return text


def save_result(file: Path, result: dict[str, Any]) -> None:
    """Write a finished row atomically: a killed run leaves no half-written row."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, file)


def run_rows(todo: list[Row], seeds: list[int] | None, quick: bool, out: Path, make_bench: Callable[[], Any],
             label: str, lrs: Callable[[], dict[str, float]] = dict) -> None:
    """Run every (row, seed) not yet on disk and save each as it finishes; the bench is built only if needed."""
    bench = None
    for row in todo:
        for seed in seeds or ([0] if quick else list(row.seeds)):
            file = row_file(out, row.name, seed, quick)
            if file.is_file():
                continue
            bench = bench or make_bench()
            print(f"{label}: {row.name} seed {seed} ...", flush=True)
            result = bench.run(row, seed, lrs())
            save_result(file, result)
            test = result.get("test", {}).get("en")
            said = f": test en R@1 {test['i2t']:.1f} / {test['t2i']:.1f}" if test else \
                f": val {result['val']}" if "val" in result else ""
            print(f"    done in {result['seconds']:.0f} s{said}", flush=True)
