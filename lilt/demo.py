"""`lilt demo`: tune the packaged backbones on built-in multilingual emoji data, offline, and show what it gained.

Four models are compared on the test emoji (never seen in training), per caption language:
1. untrained heads on the frozen towers (the starting point);
2. a closed-form baseline: a ridge map between the frozen towers' features, fitted on the training pairs;
3. the heads alone, fitted contrastively on the frozen features (the recipe's head warm-up, LP-FT's "LP");
4. the recipe's model (LilT's layer-wise adapters + norms by default) trained from there on the same pairs.
Languages listed under `eval.langs` but absent from the training data show zero-shot transfer through the
multilingual text tower. With `eval.hubness`, all four are scored with the CSLS hubness correction, each
against a bank of its own training embeddings at the k and beta its validation split prefers. With
`eval.ridge_ensemble`, the trained model's scores are mixed with the ridge map's (lilt.eval.ensemble; with
`eval.hubness` too, the weight and the correction's k and beta are chosen together);
`eval.ridge_features: stages` has the ridge map (baseline and ensemble side) read multi-scale image features, and
`eval.ridge_kernel: rbf` makes it kernel ridge regression (lilt.baselines.KernelRidgeMap), `rbf-two-way` that
map plus its reverse, captions into the image features, the two cosines mixed (lilt.baselines.TwoWayMap). With
`eval.translate`, each model's captions in data.parallel's languages are moved by translation maps fitted
on that parallel text in the model's own space (lilt.eval.translate), strength chosen on validation.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .baselines import fit_ridge, map_choices, pair_features, pooled_part, ridge_pairs
from ._io import write_json, write_text
from .config import DataConfig
from .data.parallel import parallel_of
from .data.resolve import resolve_data
from .errors import ConfigError
from .eval.ensemble import choose_weight, choose_weight_and_hubness, mix_pairs
from .eval.hubness import HubnessBank, choose_hubness
from .eval.retrieval import EmbeddedPairs, embed_pairs, retrieval_by_lang
from .eval.translate import choose_translation, embed_parallel
from .model import DualEncoder
from .plan import apply_plan, budget
from .recipe import Recipe
from .training import train, warm_up_heads

MODELS = ("untrained", "ridge", "heads", "trained")
TEST, TRAIN, VAL = range(3)


def head_embeddings(model: DualEncoder, features: EmbeddedPairs) -> EmbeddedPairs:
    """Embeddings from precomputed frozen-tower features through the model's (untrained) heads."""
    with torch.inference_mode():
        images = F.normalize(model.vision_proj(features.images.to(model.device)), dim=-1).cpu()
    return EmbeddedPairs(images, head_texts(model, features.texts), features.text_image, features.langs,
                         features.skipped)


def head_texts(model: DualEncoder, features: torch.Tensor) -> torch.Tensor:
    """Caption embeddings from frozen text-tower features through the model's text head."""
    with torch.inference_mode():
        return F.normalize(model.text_proj(features.to(model.device)), dim=-1).cpu()


def run_demo(out_dir: Path, recipe: str | Path = "demo", overrides: Sequence[str] = ()) -> int:
    """Baselines, training and the before/after table on builtin:emoji-cldr; writes results, plot, checkpoint."""
    start = time.perf_counter()
    spec = Recipe.from_file(recipe, [*overrides, f"train.output_dir={out_dir}"])
    if spec.plan is None:
        raise ConfigError(f"{recipe}: the demo trains a fresh model; its recipe needs a 'plan:' section.")
    train_config, data_config, eval_langs = spec.train, spec.data, spec.eval.langs
    torch.manual_seed(train_config.seed)
    model = DualEncoder(spec.model)
    apply_plan(model, spec.plan)
    print(f"lilt demo: {model.vision.source} + {model.text.source}, plan {model.plan_state.plan.name!r}: "
          f"{budget(model).trainable:,} trainable parameters ({budget(model).percent:.2f}%)")
    train_data, val_data, _ = resolve_data(None, data_config, train_config.seed)
    test_spec = DataConfig.from_dict({**data_config.to_dict(), "split": "test", "pairs_per_lang": None,
                                      "langs": eval_langs or data_config.langs})
    test_data, _, _ = resolve_data(None, test_spec, train_config.seed)
    counts = dict(Counter(train_data["lang"]).most_common())  # most pairs first
    print(f"training pairs per language: {counts}; test: {len(set(test_data['emoji']))} emoji, "
          f"{len(test_data)} captions in {len(set(test_data['lang']))} languages\n")

    hubness: dict[str, dict[str, float]] = {}
    translation: dict[str, dict[str, dict[str, float]]] = {}
    parallel = parallel_of(data_config, train_config.seed) if spec.eval.translate else None
    # The frozen text tower's features of the parallel text, before training moves it (untrained, ridge, heads).
    frozen_parallel = embed_parallel(model, parallel, features=True, batch_size=train_config.eval_batch_size) \
        if parallel is not None else None

    def translated(name: str, embed: Callable[[int], EmbeddedPairs],
                   space: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   features: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
                   ) -> Callable[[int], EmbeddedPairs]:
        """`embed` with captions moved by translation maps chosen on embed(VAL) (eval.translate); else `embed`.

        The parallel text is embedded like the captions: by the model itself, or (`space`) from text-tower
        features (`features`; default the frozen tower's) mapped the way that model maps caption features."""
        if parallel is None:
            return embed
        if space is None:
            source, target, langs = embed_parallel(model, parallel, batch_size=train_config.eval_batch_size)
        else:
            source, target, langs = features or frozen_parallel
            source, target = space(source), space(target)
        maps, _ = choose_translation(source, target, langs, embed(VAL))
        translation[name] = {lang: {"alpha": m.alpha, "strength": maps.strength[lang]} for lang, m in maps.maps.items()}
        return lambda i: maps.apply(embed(i))

    def scored(name: str, embed: Callable[[int], EmbeddedPairs],
               bank: HubnessBank | None = None) -> dict[str, dict[str, float]]:
        """R@1 per language of embed(TEST); with eval.hubness, corrected by `bank` or else a bank of embed(TRAIN)."""
        if not spec.eval.hubness:
            return retrieval_by_lang(embed(TEST))
        if bank is None:
            bank, _ = choose_hubness(embed(TRAIN), embed(VAL))  # k and beta chosen on validation
        hubness[name] = {"k": bank.k, "beta": bank.beta}
        return retrieval_by_lang(bank.correct(embed(TEST)))

    print("1/3 frozen features: ridge baseline and head warm-up ...", flush=True)
    workers = dict(num_workers=data_config.num_workers, batch_size=train_config.eval_batch_size)
    tables = (test_data, train_data, val_data)  # indexed by TEST, TRAIN, VAL
    stages = spec.eval.ridge_features == "stages"
    read = [pair_features(model, data, stages=stages, **workers) for data in tables]  # what the ridge map reads
    features = [pooled_part(f, model) for f in read] if stages else read  # what the heads read
    train_features, val_features = features[TRAIN], features[VAL]
    results = {"untrained": scored("untrained", translated(
        "untrained", lambda i: head_embeddings(model, features[i]), lambda t: head_texts(model, t)))}
    kernel = spec.eval.ridge_kernel
    ridge = fit_ridge(read[TRAIN], val=read[VAL], kernel=kernel)
    ridge_side = translated("ridge", lambda i: ridge_pairs(ridge, read[i]), ridge.embed_texts)
    results["ridge"] = scored("ridge", ridge_side)
    fitted = ", ".join(f"{k.removeprefix('ridge_').replace('_', ' ')} {v:g}" for k, v in map_choices(ridge).items())
    fitted += f", {kernel} kernel" if kernel != "linear" else ""
    print(f"    ridge map fitted ({fitted}{', multi-scale image features' if stages else ''}) in "
          f"{time.perf_counter() - start:.0f} s\n")

    if train_config.head_warmup_epochs or train_config.head_init == "ridge":  # here, to score the heads alone
        warm_up_heads(model, train_data, train_config, features=train_features, val=val_features)
        train_config = dataclasses.replace(train_config, head_warmup_epochs=0, head_init="random")
    results["heads"] = scored("heads", translated("heads", lambda i: head_embeddings(model, features[i]),
                                                  lambda t: head_texts(model, t)))

    print(f"2/3 training {train_config.steps} steps of batch {train_config.batch_size} ...", flush=True)
    run = train(model, train_data, train_config, data_config=data_config, val_data=val_data)
    print(f"    {run.samples_per_second:.1f} samples/s\n\n3/3 evaluating the trained model ...", flush=True)
    tuned: dict[int, EmbeddedPairs] = {}
    extra: dict[str, Any] = {}

    def embed_tuned(i: int) -> EmbeddedPairs:
        if i not in tuned:
            tuned[i] = embed_pairs(model, tables[i], **workers)
        return tuned[i]

    tuned_side = translated("trained", embed_tuned)
    map_side = ridge_side  # the ensemble's ridge side: the baseline's map, or one refitted on the trained towers
    if spec.eval.ridge_ensemble and spec.eval.ridge_towers == "tuned":
        tuned_read = [pair_features(model, data, stages=stages, **workers) for data in tables]
        tuned_ridge = fit_ridge(tuned_read[TRAIN], val=tuned_read[VAL], kernel=kernel)
        tuned_parallel = embed_parallel(model, parallel, features=True, batch_size=train_config.eval_batch_size) \
            if parallel is not None else None
        map_side = translated("trained towers' map", lambda i: ridge_pairs(tuned_ridge, tuned_read[i]),
                              tuned_ridge.embed_texts, tuned_parallel)
        extra["ridge_tuned_towers"] = map_choices(tuned_ridge)

    def trained(i: int, weight: float = 0.0) -> EmbeddedPairs:
        return mix_pairs(tuned_side(i), map_side(i), weight) if weight else tuned_side(i)

    weight, bank = 0.0, None
    if spec.eval.ridge_ensemble and spec.eval.hubness:  # weight, k and beta chosen together on validation
        weight, bank, joint = choose_weight_and_hubness(tuned_side(TRAIN), tuned_side(VAL), map_side(TRAIN),
                                                        map_side(VAL))
        extra["ridge_ensemble"] = {"weight": weight, "val_mean_recall": joint}
    elif spec.eval.ridge_ensemble:  # the trained model's scores mixed with the ridge map's, weight on validation
        weight, tried = choose_weight(trained(VAL), map_side(VAL))
        extra["ridge_ensemble"] = {"weight": weight,
                                   "val_mean_recall": {f"{w:g}": v["mean_recall"] for w, v in tried.items()}}
    results["trained"] = scored("trained", lambda i: trained(i, weight), bank)

    table = format_table(results, counts)
    print("\nTest-split retrieval R@1 (%), over all test emoji of each language:\n" + table)
    if spec.eval.ridge_ensemble:
        again = "--ridge-ensemble --train-data builtin:emoji-cldr:train"
        if parallel is not None:
            again += f" --parallel {data_config.parallel} --parallel-langs {' '.join(data_config.parallel_targets())}"
        if spec.eval.hubness:
            again += " --hubness"
        if stages:
            again += " --ridge-features stages"
        if kernel != "linear":
            again += f" --ridge-kernel {kernel}"
        if spec.eval.ridge_towers == "tuned":
            again += " --ridge-towers tuned"
        on = " refitted on the trained towers' features" if spec.eval.ridge_towers == "tuned" else ""
        print(f"trained = the tuned model's scores mixed with the ridge map's{on} (eval.ridge_ensemble), weight "
              f"{weight:g} chosen on validation{' with the hubness correction' if spec.eval.hubness else ''}. The "
              f"saved model "
              f"is the tuned one; `lilt eval {again} --val-data builtin:emoji-cldr:validation` mixes it again.")
    if translation:
        extra["translation"] = translation
        chosen = "; ".join(f"{name} " + ", ".join(f"{lang} {m['strength']:g}" for lang, m in maps.items())
                           for name, maps in translation.items())
        print(f"captions translated by maps fitted on the parallel text (eval.translate), strength per language "
              f"chosen on validation: {chosen}")
    if hubness:
        extra["hubness"] = hubness
        print("scored with the CSLS hubness correction (eval.hubness), k / beta chosen on validation: "
              + ", ".join(f"{name} {h['k']} / {h['beta']:g}" for name, h in hubness.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "demo_results.json", {"train_pairs": counts, "results": results, **extra})
    write_text(out_dir / "demo_results.md", table + "\n")
    plot = plot_demo(results, run.history, out_dir / "demo.png")
    print(f"\nresults: {out_dir / 'demo_results.md'} (+ .json)\nplot:    {plot}\n"
          f"model:   {out_dir / 'model'}  (reload: lilt.DualEncoder.from_pretrained('{out_dir / 'model'}'))\n"
          f"done in {time.perf_counter() - start:.0f} s")
    return 0


def format_table(results: dict[str, dict[str, dict[str, float]]], counts: dict[str, int]) -> str:
    """A Markdown table: per language, training pairs and R@1 both ways for each model."""
    langs = [lang for lang in results["trained"] if lang != "all"]
    head = "| lang | train pairs | " + " | ".join(f"{m} i2t | {m} t2i" for m in MODELS) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(MODELS))]
    for lang in sorted(langs, key=lambda x: (-counts.get(x, 0), x)):
        cells = [f"{results[m][lang]['i2t/R@1']:.1f} | {results[m][lang]['t2i/R@1']:.1f}" for m in MODELS]
        rows.append(f"| {lang} | {counts.get(lang, 0)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_demo(results: dict[str, Any], history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss and validation recall over steps; test R@1 per language for the three models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    steps = [h["step"] for h in history if "loss" in h]
    left.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("contrastive loss")
    evals = [h for h in history if "val/all/i2t/R@1" in h]
    if evals:
        twin = left.twinx()
        twin.plot([h["step"] for h in evals], [h["val/all/i2t/R@1"] for h in evals], "o-", color="C1",
                  label="validation R@1 (image->text)")
        twin.set_ylabel("R@1 (%)")
        twin.legend(loc="lower right")
    left.legend(loc="upper left")
    langs = [lang for lang in results["trained"] if lang != "all"]
    width = 0.8 / len(MODELS)
    for i, name in enumerate(MODELS):
        right.bar([x + i * width for x in range(len(langs))], [results[name][lang]["i2t/R@1"] for lang in langs],
                  width, label=name)
    right.set_xticks([x + width for x in range(len(langs))], langs)
    right.set_ylabel("test R@1 image->text (%)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
