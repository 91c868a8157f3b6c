"""`lilt eval`: score a saved model on a dataset (retrieval, zero-shot, linear probe) and write a report."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ..errors import ConfigError

logger = logging.getLogger(__name__)

Task = Literal["retrieval", "zeroshot", "linear-probe"]
EMOJI = "builtin:emoji-cldr"


def run_eval(model: Any, data: str, out: str | Path, *, task: Task = "retrieval", langs: Sequence[str] | None = None,
             classnames: str | Path | None = None, templates: str | Path | None = None, train_data: str | None = None,
             label_column: str = "label", batch_size: int = 256, num_workers: int = 0,
             model_name: str | None = None, split: str | None = None,
             columns: Mapping[str, str] | None = None, hubness: bool = False, ridge_ensemble: bool = False,
             val_data: str | None = None, parallel: str | None = None, parallel_langs: Sequence[str] | None = None,
             ridge_features: str = "pooled",
             ridge_kernel: str = "linear",
             ridge_towers: str = "frozen") -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Evaluate `model` (a DualEncoder or a saved folder) on `data`; write eval.{json,md,png} under `out`.

    `columns`: load_pairs' image_column/text_column/lang_column for a table whose columns are named otherwise
    (zero-shot and linear probe use its image_column).
    Retrieval groups a table's rows by image, so one row per caption scores as one image with many captions.
    `hubness` (retrieval): the CSLS correction against the model's embeddings of `train_data`, k and beta
    chosen on `val_data` (lilt.eval.hubness). `ridge_ensemble` (retrieval): the model's scores mixed with
    a ridge map fitted on the frozen towers' features of `train_data`, the weight chosen on `val_data`
    (lilt.eval.ensemble). Both together: the correction applies to the mixed scores, its k and beta chosen
    on `val_data` together with the weight. `parallel`
    (retrieval): captions in `parallel_langs` translated by maps fitted on that parallel text, strength chosen
    on `val_data` (lilt.eval.translate); with the ensemble, on both of its sides. `ridge_features`: 'stages'
    has the ensemble's ridge map read multi-scale image features (lilt.baselines.pair_features);
    `ridge_kernel`: 'rbf' makes that map kernel ridge regression (lilt.baselines.KernelRidgeMap), 'rbf-two-way'
    adds its reverse, captions -> image features (lilt.baselines.TwoWayMap). `ridge_towers`: 'tuned' fits that
    map on the model's own towers' features instead of the frozen ones.
    """
    import lilt
    from ..baselines import KERNELS
    from ..data import load_labelled, load_pairs
    from .ensemble import TOWERS
    from .report import report_rows, write_report

    if isinstance(model, (str, Path)):
        model_name = model_name or str(model)
        model = lilt.DualEncoder.from_pretrained(model)
    options = dict(batch_size=batch_size, num_workers=num_workers)
    extra: dict[str, Any] = {}
    if ridge_features not in ("pooled", "stages") or (ridge_features == "stages" and not ridge_ensemble):
        raise ConfigError(f"--ridge-features {ridge_features}: choose pooled or stages; stages goes with "
                          "--ridge-ensemble (it is what the ensemble's ridge map reads).")
    if ridge_kernel not in KERNELS or (ridge_kernel != "linear" and not ridge_ensemble):
        raise ConfigError(f"--ridge-kernel {ridge_kernel}: choose one of {', '.join(KERNELS)}; all but linear go "
                          "with --ridge-ensemble (it is the ensemble's ridge map).")
    if ridge_towers not in TOWERS or (ridge_towers == "tuned" and not ridge_ensemble):
        raise ConfigError(f"--ridge-towers {ridge_towers}: choose one of {', '.join(TOWERS)}; tuned goes with "
                          "--ridge-ensemble (it is the towers the ensemble's ridge map reads).")
    levers = [flag for flag, on in (("--hubness", hubness), ("--ridge-ensemble", ridge_ensemble)) if on]
    if parallel and (task != "retrieval" or not val_data):
        raise ConfigError(f"--parallel {parallel} (task {task}, --val-data {val_data}) translates retrieval captions: "
                          "use --task retrieval with --val-data SPEC (e.g. builtin:emoji-cldr:validation; it chooses "
                          "the strength).")
    if levers and (task != "retrieval" or not train_data or not val_data):
        raise ConfigError(f"{' '.join(levers)} (task {task}, --train-data {train_data}, --val-data {val_data}) "
                          "scores retrieval with what the training pairs give: use --task retrieval with --train-data "
                          "SPEC (e.g. builtin:emoji-cldr:train) and --val-data SPEC (it chooses the strength).")
    if task == "retrieval":
        pairs = load_pairs(data, split=split or _split(data), langs=langs, **(columns or {}))
        if levers or parallel:
            table = None
            if parallel:
                from ..data.parallel import load_parallel
                table = load_parallel(parallel, parallel_langs)
            results, extra = _retrieval_with_levers(model, pairs, train_data, val_data, langs, columns, hubness,
                                                    ridge_ensemble, options, table, ridge_features == "stages",
                                                    ridge_kernel, ridge_towers)
        else:
            results = lilt.evaluate_retrieval(model, pairs, progress=True, **options)
    elif task == "zeroshot":
        results = _zeroshot(model, data, split, langs, classnames, templates, label_column, options,
                            (columns or {}).get("image_column", "image"))
    elif task == "linear-probe":
        from .probe import linear_probe
        if not train_data:
            raise ConfigError("--task linear-probe needs --train-data SPEC (labelled images to fit the probe on).")
        image_column = (columns or {}).get("image_column", "image")
        train = load_labelled(train_data, split=_split(train_data), label_column=label_column,
                              image_column=image_column)
        test = load_labelled(data, split=split or _split(data), label_column=label_column, image_column=image_column,
                             names=train.features["label"].names)  # the same class ids in both splits
        results = {"all": linear_probe(model, train, test, label_column="label", **options)}
    else:
        raise ConfigError(f"unknown task {task!r}; choose retrieval, zeroshot or linear-probe.")
    budget = lilt.budget(model)
    plan = model.plan_state.plan.name if model.plan_state is not None else ""
    dataset_name = data if split is None or data.count(":") > 1 else f"{data}:{split}"
    rows = report_rows(results, dataset=dataset_name, task=task, model=model_name or plan or "model",
                       extra={"plan": plan, "trainable_percent": round(budget.percent, 4),
                              "vision": model.vision.source, "text": model.text.source, **extra})
    return rows, write_report(rows, Path(out), name="eval")


def _retrieval_with_levers(model: Any, pairs: Any, train_data: str, val_data: str, langs: Sequence[str] | None,
                           columns: Mapping[str, str] | None, hubness: bool, ridge_ensemble: bool,
                           options: dict[str, Any], parallel: Any = None,
                           stages: bool = False, kernel: str = "linear",
                           towers: str = "frozen") -> tuple[dict[str, Any], dict[str, Any]]:
    """Retrieval with translation maps, the ridge ensemble and/or the hubness correction, chosen on `val_data`."""
    from ..baselines import map_choices
    from ..data import load_pairs
    from .ensemble import fit_ridge_ensemble
    from .hubness import choose_hubness
    from .retrieval import embed_pairs, retrieval_by_lang
    from .translate import choose_translation, embed_parallel

    val = load_pairs(val_data, split=_split(val_data), langs=langs, **(columns or {}))
    train = load_pairs(train_data, split=_split(train_data), langs=langs, **(columns or {})) if train_data else None
    extra: dict[str, Any] = {}
    embed: Any = partial(embed_pairs, model)
    if ridge_ensemble:
        ensemble, _ = fit_ridge_ensemble(model, train, val, progress=True, parallel=parallel, stages=stages,
                                         kernel=kernel, hubness=hubness, towers=towers, **options)
        extra.update(ridge_ensemble_weight=ensemble.weight, ridge_features="stages" if stages else "pooled",
                     ridge_kernel=kernel, ridge_towers=towers, **map_choices(ensemble.ridge))
        embed = ensemble.embed_pairs
        maps = ensemble.translation
    elif parallel is not None:
        maps, _ = choose_translation(*embed_parallel(model, parallel, batch_size=options["batch_size"]),
                                     embed_pairs(model, val, progress=True, **options))
        embed = lambda data, **kw: maps.apply(embed_pairs(model, data, **kw))  # noqa: E731
    if parallel is not None:
        extra.update({f"translation_strength_{lang}": maps.strength[lang] for lang in maps.maps})
    test = embed(pairs, progress=True, **options)
    if hubness:
        bank = ensemble.hubness if ridge_ensemble else choose_hubness(  # the ensemble's: chosen with its weight
            embed(train, progress=True, **options), embed(val, progress=True, **options))[0]
        extra.update(hubness_k=bank.k, hubness_beta=bank.beta)
        test = bank.correct(test)
    if train_data:
        extra["levers_fitted_on"] = train_data
    return retrieval_by_lang(test), extra


def _split(spec: str) -> str:
    """Default split: a built-in's test split (unless the spec names one); a folder or table's only split, train."""
    return "test" if spec.startswith("builtin:") else "train"


def _zeroshot(model: Any, data: str, split: str | None, langs: Sequence[str] | None, classnames: str | Path | None,
              templates: str | Path | None, label_column: str, options: dict[str, Any],
              image_column: str = "image") -> dict[str, Any]:
    from ..data import load_labelled
    from .zeroshot import emoji_zeroshot, evaluate_zeroshot

    if data.startswith(EMOJI):
        dataset, names = emoji_zeroshot(data[len(EMOJI) + 1:] or split or "test",
                                        langs=tuple(langs or ("en", "sw", "yo", "am", "ha", "mr")))
    else:
        dataset = load_labelled(data, split=split or _split(data), label_column=label_column,
                                image_column=image_column)
        names = dataset.features["label"].names  # folder or label names, in label order
    if classnames is not None:
        names = _read_classnames(classnames)
    if langs and isinstance(names, dict):
        missing = [lang for lang in langs if lang not in names]
        if missing:
            raise ConfigError(f"--langs {missing}: no class names in those languages (the names have {sorted(names)}).")
        names = {lang: names[lang] for lang in langs}
    return evaluate_zeroshot(model, dataset, names, templates, label_column="label", **options)


def _read_classnames(path: str | Path) -> list[str] | dict[str, list[str]]:
    """A YAML/JSON list of class names in label order, or {lang: [names...]}."""
    import json

    import yaml

    text = Path(path).read_text(encoding="utf-8")
    names = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(names, (list, dict)):
        raise ConfigError(f"--classnames {path}: expected a list of class names or {{lang: [names]}}, "
                          f"got {type(names).__name__}.")
    return names
