"""`lilt` command line: info | train | grow | eval | embed | search | serve | report | curate | demo | recipes |
push."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import DEFAULT_TEXT, DEFAULT_VISION
from .errors import ConfigError, LiltError
from .recipe import Recipe


def cmd_info(args: argparse.Namespace) -> int:
    """Print the budget table of a recipe applied to the given (or default) backbones."""
    import lilt

    if args.methods:
        for spec in lilt.METHODS.values():
            print(f"{spec.name:<10} {spec.summary}")
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(spec.options)}
            for name, text in spec.options.field_help().items():
                print(f"{'':<12}{name} (default {defaults[name]!r}): {text}")
        return 0
    if not args.recipe:
        raise ConfigError("lilt info needs --recipe NAME|FILE (e.g. lwa; `lilt recipes` lists them), or --methods.")
    plan = lilt.TuningPlan.from_recipe(args.recipe)  # a misspelt name fails before the backbones load
    model = lilt.DualEncoder.from_backbones(args.vision, args.text)
    lilt.apply_plan(model, plan)
    report = lilt.budget(model)
    if args.json:
        out = report.to_dict()
        out["backbones"] = {"vision": args.vision, "text": args.text}
        print(json.dumps(out, indent=2))
    else:
        print(f"vision: {args.vision} ({model.vision.num_blocks} blocks, {model.vision.block_kind})")
        print(f"text:   {args.text} ({model.text.num_blocks} blocks, {model.text.block_kind}, "
              f"pooling={model.text.pooling}, prefix={model.text.prefix!r})")
        print(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Tune the packaged backbones on built-in multilingual data; before/after table, plot and checkpoint."""
    from .demo import run_demo

    return run_demo(Path(args.output_dir), args.recipe, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe: its model, plan, train and data sections, with KEY=VALUE overrides."""
    overrides = [*args.overrides, *([f"train.output_dir={args.output_dir}"] if args.output_dir else [])]
    recipe = Recipe.from_file(args.recipe, overrides)  # every section checked before torch loads
    recipe.require_model_source()
    import torch

    import lilt
    from .training import train

    torch.manual_seed(recipe.train.seed)  # the same fresh heads and adapters on every process
    if recipe.init is not None:
        model = initial_model(recipe.init, recipe.plan)
    else:
        model = lilt.DualEncoder(recipe.model)
        lilt.apply_plan(model, recipe.plan)
    result = train(model, recipe.data, recipe.train)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch` the summary is printed once
        return 0
    for stage in result.stages:
        recall = [v for k, v in stage.items() if k.startswith("val/all/") and k.endswith("R@1")]
        print(f"stage {stage['stage']}: {stage['pairs']} pairs, {stage['trainable']:,} trainable parameters, grew "
              f"{', '.join(stage['growth']) or 'nothing'}"
              + (f", validation R@1 (i2t, t2i) {', '.join(f'{v:.1f}' for v in recall)}" if recall else ""))
    if result.metrics:
        print(json.dumps({k: round(v, 2) for k, v in result.metrics.items() if k.endswith("R@1")}, indent=1))
    print(f"{result.steps} steps, {result.samples_per_second:.1f} samples/s, {result.bad_items} unreadable items "
          f"skipped; model saved to {result.output_dir / 'model'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved model; write eval.json / eval.md / eval.png and print the table."""
    from .eval.report import markdown_table
    from .eval.run import run_eval

    rows, paths = run_eval(args.model, args.data, args.out, task=args.task, langs=args.langs,
                           classnames=args.classnames, templates=args.templates, train_data=args.train_data,
                           label_column=args.label_column, batch_size=args.batch_size, num_workers=args.num_workers,
                           split=args.split, columns=_columns(args), hubness=args.hubness,
                           ridge_ensemble=args.ridge_ensemble, val_data=args.val_data, parallel=args.parallel,
                           ridge_features=args.ridge_features, ridge_kernel=args.ridge_kernel,
                           ridge_towers=args.ridge_towers,
                           parallel_langs=args.parallel_langs)
    print(markdown_table(rows))
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Export image or caption embeddings of a dataset (safetensors + Parquet ids, or one Parquet)."""
    import lilt
    from .data import load_pairs
    from .embeddings import export_embeddings

    model = lilt.DualEncoder.from_pretrained(args.model)
    # Images alone need no caption column; one named with --text-column must still exist.
    data = load_pairs(args.data, split=args.split, langs=args.langs, **_columns(args),
                      captions=args.what == "text" or args.text_column is not None)
    if args.id_column and args.id_column not in data.column_names:
        ids = _id_column(args)
        if len(ids) != len(data):
            raise ConfigError(f"--id-column {args.id_column}: {len(ids)} values for {len(data)} pairs; the column "
                              "must come from the same table as the pairs.")
        data = data.add_column(args.id_column, ids)
    written = export_embeddings(model, data, args.what, args.out, id_column=args.id_column, append=args.append,
                                batch_size=args.batch_size, num_workers=args.num_workers)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"nothing to add: every id is already in {args.out}")
    return 0


def _columns(args: argparse.Namespace) -> dict[str, str]:
    """load_pairs column names from --image-column/--text-column/--lang-column (only those given)."""
    names = {"image_column": args.image_column, "text_column": args.text_column, "lang_column": args.lang_column}
    return {k: v for k, v in names.items() if v is not None}


def _id_column(args: argparse.Namespace) -> list[str]:
    """The source's --id-column, row for row with load_pairs(source), which keeps only image/text/lang."""
    # A second read of the same local file or folder; load_pairs cannot yet keep an extra column.
    import datasets

    path, suffix = Path(args.data), Path(args.data).suffix.lower()
    if path.is_file() and suffix in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        raw = datasets.load_dataset({".tsv": "csv", ".jsonl": "json"}.get(suffix, suffix[1:]), data_files=str(path),
                                    split="train", **({"delimiter": "\t"} if suffix == ".tsv" else {}))
    elif path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        raw = datasets.load_from_disk(str(path))
        raw = raw[args.split] if isinstance(raw, datasets.DatasetDict) else raw
    elif path.is_dir():
        raw = datasets.load_dataset("imagefolder", data_dir=str(path), split=args.split)
    else:
        raise ConfigError(f"--id-column reads a local table or folder; {args.data!r} is neither (omit --id-column: "
                          "images are then named by their file path).")
    if args.id_column not in raw.column_names:
        raise ConfigError(f"--id-column {args.id_column!r} is not a column of {args.data} (columns: "
                          f"{', '.join(raw.column_names)}).")
    if args.langs:
        wanted = set(args.langs)
        lang = args.lang_column or "lang"
        raw = raw.filter(lambda batch: [x in wanted for x in batch[lang]], batched=True)
    return [str(v) for v in raw[args.id_column]]


def cmd_search(args: argparse.Namespace) -> int:
    """Answer text and image queries against an index exported by `lilt embed`."""
    import lilt
    from .embeddings import open_index, search_index

    queries = [*args.queries, *(args.query or [])]
    if not queries and not args.image:
        raise ConfigError("lilt search needs a query: `lilt search --model M --index I \"a red boat\"` "
                          "or --image photo.jpg.")
    model = lilt.DualEncoder.from_pretrained(args.model)
    index = open_index(args.index)
    results = search_index(model, index, queries, args.image or [], k=args.k)
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
        return 0
    for result, is_image in zip(results, [False] * len(queries) + [True] * len(args.image or [])):
        print(f"{result['query']!r}{' (image)' if is_image else ''}:")
        for hit in result["hits"]:
            print(f"  {hit['rank']:>2}. {hit['score']:.3f}  {hit_label(hit)}")
    return 0


def hit_label(hit: dict[str, Any]) -> str:
    """What a search hit shows: an image's path or a caption's text (with the id when that differs), else the id."""
    shown = hit.get("path") or hit.get("text") or hit["id"]
    return shown if shown == hit["id"] else f"{shown}  [{hit['id']}]"


def cmd_serve(args: argparse.Namespace) -> int:
    """A search page (gradio) over one index, or two models' indexes side by side."""
    from .serve import build_app, load_searcher, require_gradio

    require_gradio()  # before minutes of model loading
    if (args.model2 is None) != (args.index2 is None):
        raise ConfigError("--model2 and --index2 go together: the second model and the index it exported.")
    searchers = [load_searcher(args.model, args.index)]
    if args.model2:
        searchers.append(load_searcher(args.model2, args.index2))
    build_app(searchers, k=args.k).launch(server_name=args.host, server_port=args.port)
    return 0


def add_serve_parser(sub: Any) -> None:
    """`lilt serve`: its arguments."""
    serve = sub.add_parser("serve", help="a search page over exported indexes (needs the extra lilt[serve])")
    serve.add_argument("--model", required=True, help="a folder written by save_pretrained / lilt train")
    serve.add_argument("--index", required=True, help="an index the model exported with lilt embed")
    serve.add_argument("--model2", help="a second model, shown side by side")
    serve.add_argument("--index2", help="the index the second model exported")
    serve.add_argument("--port", type=int, default=7860, help="default 7860")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 serves the network)")
    serve.add_argument("-k", type=int, default=8, help="hits shown per model (default 8)")
    serve.set_defaults(func=cmd_serve)


def cmd_report(args: argparse.Namespace) -> int:
    """Compare evaluated runs side by side (and plot recall vs % trainable parameters)."""
    from .eval.report import compare_runs, plot_vs_trainable

    table, rows = compare_runs([Path(r) for r in args.runs], metric=args.metric)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.md").write_text(table + "\n")
        pooled = "all" if any(r["language"] == "all" for r in rows) else "mean"  # zero-shot pools as "mean"
        print(f"\nplot: {plot_vs_trainable(rows, Path(args.out) / 'report.png', metric=args.metric, language=pooled)}")
    return 0


def cmd_grow(args: argparse.Namespace) -> int:
    """Grow a saved model offline (function-preserving at momentum 1) and save the grown checkpoint."""
    import torch

    import lilt
    from .growth import Inheritance, grow_

    out = Path(args.out or args.model)
    if out.exists() and out.resolve() != Path(args.model).resolve() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder (or omit --out to grow "
                          f"{args.model} in place).")
    model = lilt.DualEncoder.from_pretrained(args.model)
    before = lilt.budget(model).trainable
    torch.manual_seed(args.seed)
    inherit = Inheritance(momentum=args.inherit_momentum, width_init=args.width_init)
    for op in args.op:
        result = grow_(model, op, inherit)
        print(f"{result.op.spec()}: {len(result.added)} new tensors, {len(result.widened)} widened")
    model.save_pretrained(out)
    print(f"trainable parameters {before:,} -> {lilt.budget(model).trainable:,}; saved to {out}")
    return 0


def initial_model(init: Any, plan: Any) -> Any:
    """A recipe's `init:` section: continue from a saved model, optionally swapping its text tower."""
    import lilt
    from .swap import swap_text_tower

    model = lilt.DualEncoder.from_pretrained(init.source)
    return swap_text_tower(model, init.swap_text, plan) if init.swap_text is not None else model


# -- lilt curate: score pairs, keep the best share --------------------------------------------------
def cmd_curate(args: argparse.Namespace) -> int:
    """Score every pair of a source and keep the top share; print the summary's main numbers."""
    import time

    from .curation import curate

    start = time.perf_counter()
    result = curate(args.data, scorer=args.scorer, keep=args.keep, out=args.out, per_lang=args.per_lang,
                    langs=args.langs, noise=args.noise, trusted=args.trusted, split=args.split,
                    batch_size=args.batch_size, chunk_size=args.chunk_size)
    summary = result.summary
    cut = f"cut {summary['cut']:.4f}" if summary["cut"] is not None else "cut per language"
    print(f"kept {summary['kept']} of {summary['pairs']} pairs ({cut}; {summary['unreadable']} unreadable) "
          f"in {time.perf_counter() - start:.1f}s")
    for lang, row in summary["per_language"].items():
        print(f"  {lang}: {row['kept']}/{row['pairs']} kept, mean score {row['mean_score']}, cut {row['cut']}")
    if "noise" in summary:
        noise = summary["noise"]
        print(f"noise removal: precision {noise['precision']:.3f} (discarded pairs that were noisy), recall "
              f"{noise['recall']:.3f} (noisy pairs discarded); noisy share {noise['noisy_share_before']:.3f} -> "
              f"{noise['noisy_share_after']:.3f}")
    print(f"wrote {result.kept} (train on it: lilt train ... data.source={result.kept}), {result.scores}, "
          f"{result.out / 'histogram.png'}, {result.out / 'summary.json'}")
    return 0


def add_curate_parser(sub: Any) -> None:
    """`lilt curate`: its arguments."""
    curate = sub.add_parser("curate", help="score image-text pairs and keep the best-matched share (data curation)")
    curate.add_argument("--data", required=True, help="a pair source, e.g. builtin:emoji-cldr or pairs.parquet")
    curate.add_argument("--scorer", default="crossfit", help="'crossfit' (default: packaged towers + ridge maps "
                        "fitted on the pairs themselves, 5 folds of images; each pair scored by a map that never saw "
                        "its image), 'frozen' (one map fitted on --trusted pairs) or 'model:DIR' (a trained model)")
    curate.add_argument("--keep", type=float, default=0.4, help="share of pairs kept, the best-scored (default 0.4)")
    curate.add_argument("--out", required=True, help="folder for kept.parquet, scores.parquet, histogram.png, "
                        "summary.json and the resumable chunks/")
    curate.add_argument("--per-lang", action="store_true", help="keep the share within each language")
    curate.add_argument("--langs", nargs="+", help="only captions in these languages")
    curate.add_argument("--noise", type=float, default=0.0, help="builtin:emoji-cldr: re-pair this share of the "
                        "captions with wrong images first, to measure how much curation removes")
    curate.add_argument("--trusted", help="clean pairs the 'frozen' scorer's ridge map is fitted on (default: a "
                        "built-in's validation split)")
    curate.add_argument("--split", default="train", help="split of the source to curate (default train; "
                        "builtin:emoji-cldr also takes all: every split, 170k captions)")
    curate.add_argument("--batch-size", type=int, default=64, help="pairs embedded per batch (default 64; "
                        "memory grows with it: about 2.8 GB peak at 64, 5.5 GB at 256 with the packaged towers)")
    curate.add_argument("--chunk-size", type=int, default=2048, help="pairs per saved chunk of scores (default 2048)")
    curate.set_defaults(func=cmd_curate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `lilt` command."""
    parser = argparse.ArgumentParser(prog="lilt", description="Parameter-efficient contrastive alignment of "
                                     "frozen vision and language backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="budget table of a recipe's plan on the given backbones")
    info.add_argument("--recipe", help="built-in recipe name (`lilt recipes`) or YAML/JSON file with a plan: section")
    info.add_argument("--vision", default=DEFAULT_VISION, help=f"vision backbone (default {DEFAULT_VISION})")
    info.add_argument("--text", default=DEFAULT_TEXT, help=f"text backbone (default {DEFAULT_TEXT})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--methods", action="store_true", help="list the tuning methods and their options")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a recipe (also under `accelerate launch -m lilt.cli train`)")
    train.add_argument("--recipe", required=True, help="built-in recipe name (`lilt recipes`) or YAML/JSON file "
                       "with model/plan/train/data sections")
    train.add_argument("--output-dir", help="overrides train.output_dir")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides, e.g. train.steps=200 data.langs=[en,sw] model.vision.image_size=128")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a saved model: retrieval, zero-shot or linear probe, per language")
    ev.add_argument("--model", required=True, help="a folder written by save_pretrained / lilt train")
    ev.add_argument("--data", required=True, help="a pair source, e.g. builtin:emoji-cldr:test or a folder")
    ev.add_argument("--task", default="retrieval", choices=["retrieval", "zeroshot", "linear-probe"])
    ev.add_argument("--split", help="split to score (default: a built-in's test split, else the source's train "
                    "split - the only one a folder or table has)")
    ev.add_argument("--langs", nargs="+", help="only these caption languages (default: all in the data)")
    ev.add_argument("--out", default="eval-out", help="where eval.json/.md/.png go (default eval-out)")
    ev.add_argument("--classnames", help="zero-shot: YAML/JSON class names in label order, or {lang: [names]}")
    ev.add_argument("--templates", help="zero-shot: YAML/JSON {lang: [templates with {}]} (default: shipped ones)")
    ev.add_argument("--train-data", help="linear probe: labelled images to fit it on; --hubness: the model's "
                    "training pairs (the bank)")
    ev.add_argument("--val-data", help="--hubness: pairs to choose k and beta on (e.g. builtin:emoji-cldr:validation)")
    ev.add_argument("--hubness", action="store_true", help="retrieval with the CSLS hubness correction against "
                    "--train-data (see README, Evaluation)")
    ev.add_argument("--ridge-ensemble", action="store_true", help="retrieval mixed with a ridge map on the frozen "
                    "towers' features of --train-data (see README, Evaluation)")
    ev.add_argument("--ridge-features", default="pooled", choices=["pooled", "stages"], help="--ridge-ensemble: "
                    "what its ridge map reads of each image (stages: pooled plus each vision block's pooled output)")
    ev.add_argument("--ridge-kernel", default="linear", choices=["linear", "rbf", "rbf-two-way"],
                    help="--ridge-ensemble: its ridge map's kind (rbf: kernel ridge regression, alpha and width chosen "
                    "on --val-data; rbf-two-way: plus the reverse map, captions -> image features, mixed)")
    ev.add_argument("--ridge-towers", default="frozen", choices=["frozen", "tuned"], help="--ridge-ensemble: the "
                    "towers its ridge map reads (tuned: the model's own, instead of the pretrained backbones)")
    ev.add_argument("--parallel", help="retrieval with captions translated by maps fitted on this parallel text "
                    "(builtin:emoji-cldr or a source/target/lang table), strength chosen on --val-data")
    ev.add_argument("--parallel-langs", nargs="+", help="--parallel: its target languages (needed for "
                    "builtin:emoji-cldr, e.g. sw yo)")
    ev.add_argument("--label-column", default="label", help="zero-shot / linear probe: the label column")
    embed = sub.add_parser("embed", help="export image or caption embeddings of a dataset for search")
    embed.add_argument("--model", required=True)
    embed.add_argument("--data", required=True, help="a pair source")
    embed.add_argument("--split", default="train", help="split of the source (builtin:NAME:SPLIT also works)")
    embed.add_argument("--langs", nargs="+", help="only captions in these languages")
    embed.add_argument("--what", default="image", choices=["image", "text"])
    embed.add_argument("--out", required=True, help="FILE: FILE.safetensors + FILE.parquet, or FILE.parquet alone")
    embed.add_argument("--id-column", help="a column of the source to use as ids (default: the image's file path, "
                       "or the caption for --what text)")
    embed.add_argument("--append", action="store_true", help="add items whose ids are not in the index at --out yet "
                       "(same model and --what)")
    search = sub.add_parser("search", help="text or image queries against an index made by `lilt embed`")
    search.add_argument("queries", nargs="*", metavar="QUERY", help="text queries, in any language the model reads")
    search.add_argument("--model", required=True)
    search.add_argument("--index", required=True, help="the .safetensors or .parquet written by lilt embed")
    search.add_argument("--query", nargs="+", help="more text queries")
    search.add_argument("--image", action="append", help="an image file as the query (repeatable)")
    search.add_argument("-k", type=int, default=5, help="hits per query (default 5)")
    search.add_argument("--json", action="store_true", help="print [{query, hits: [{rank, id, score, ...}]}]")
    report = sub.add_parser("report", help="compare the eval.json of several runs side by side")
    report.add_argument("runs", nargs="+", help="folders holding eval.json (lilt eval --out)")
    report.add_argument("--metric", default="i2t/R@1")
    report.add_argument("--out", help="write report.md and report.png (recall vs %% trainable) here")
    grow = sub.add_parser("grow", help="grow a saved model: deeper or wider trainable parts, or a shared encoder")
    grow.add_argument("--model", required=True, help="a folder written by save_pretrained / lilt train")
    grow.add_argument("--op", required=True, action="append",
                      help="growth op, repeatable: depth:TOWER:N[:top|interleave][:transformer], "
                      "width:TARGET:FACTOR[:vision|text] (adapter, lora, blocks, heads, shared), shared:DEPTH:WIDTH")
    grow.add_argument("--out", help="where the grown checkpoint goes (default: over --model)")
    grow.add_argument("--inherit-momentum", type=float, default=1.0,
                      help="new = m * inherited + (1 - m) * fresh; 1 (default) keeps the model's outputs exactly")
    grow.add_argument("--width-init", default="split", choices=["split", "zero"])
    grow.add_argument("--seed", type=int, default=0, help="seed of the fresh values mixed in when m < 1")
    for command, func in ((ev, cmd_eval), (embed, cmd_embed), (search, cmd_search), (report, cmd_report),
                          (grow, cmd_grow)):
        command.set_defaults(func=func)
    for command in (ev, embed):
        command.add_argument("--batch-size", type=int, default=256)
        command.add_argument("--num-workers", type=int, default=0)
        command.add_argument("--image-column", help="a table's image column (default image; imagefolder: file_name)")
        command.add_argument("--text-column", help="a table's caption column (default text)")
        command.add_argument("--lang-column", help="a table's caption-language column (default lang; optional)")

    demo = sub.add_parser("demo", help="end-to-end run on the packaged backbones (offline)")
    demo.add_argument("--output-dir", default="demo-out", help="results, plot and model (default demo-out)")
    demo.add_argument("--recipe", default="demo", help="the demo's recipe: a name or file (default: built-in demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.steps=50")
    demo.set_defaults(func=cmd_demo)
    add_publishing_commands(sub)
    add_serve_parser(sub)
    add_curate_parser(sub)
    return parser


# -- built-in recipes and publishing (lilt recipes, lilt push) -------------------------------------
def cmd_recipes(args: argparse.Namespace) -> int:
    """List the built-in recipes (name, kind, sections, description), or print one to copy and edit."""
    from .configbase import read_mapping
    from .recipe import NOT_RECIPES, RECIPES_DIR, builtin_recipes, resolve_recipe

    if args.name:
        print(resolve_recipe(args.name).read_text(encoding="utf-8"), end="")
        return 0
    rows = []
    for name, path in builtin_recipes().items():
        data = read_mapping(path)
        plan = data.get("plan") if isinstance(data.get("plan"), dict) else {}
        plan_only = set(data) == {"plan"}  # a method's recipe: its plan's description says it all
        rows.append((name, path.parent.name if path.parent != RECIPES_DIR else "demo", "+".join(data),
                     (plan_only and plan.get("description")) or _first_comment(path)))
    width = max(len(r[0]) for r in rows) + 2
    for name, kind, sections, description in sorted(rows, key=lambda r: (r[1], r[0])):
        print(f"{name:<{width}}{kind:<14}{sections:<28}{description}")
    extra = sorted(p for folder in NOT_RECIPES for p in (RECIPES_DIR / folder).glob("*.yaml"))
    if extra:
        print("\naccelerate launch configs (accelerate launch --config_file PATH -m lilt.cli train --recipe NAME):")
        print("\n".join(f"  {p}" for p in extra))
    return 0


def _first_comment(path: Path, width: int = 90) -> str:
    """The first sentence of a recipe's opening comment (the situation it is for), cut to `width` characters."""
    comment = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = " ".join(comment).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[:width - 3].rstrip() + "..."


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a saved model folder (with its model card) to the Hugging Face Hub."""
    from .checkpoint import check_weights, read_manifest
    from .hub import push_folder, update_card_evaluation

    check_weights(Path(args.model), read_manifest(args.model))  # never publish a damaged or edited checkpoint
    if args.eval:
        file = Path(args.eval) / "eval.json" if Path(args.eval).is_dir() else Path(args.eval)
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--eval {args.eval}: cannot read eval.json rows ({err}); give `lilt eval --out`'s "
                              "folder or its eval.json.") from None
        print(f"model card evaluation updated: {update_card_evaluation(args.model, rows)}")
    print(f"pushed {args.model} to {args.repo}: {push_folder(args.model, args.repo, private=args.private)}")
    return 0


def add_publishing_commands(sub: Any) -> None:
    """The `recipes` and `push` subcommands."""
    recipes = sub.add_parser("recipes", help="list the built-in recipes (use a name wherever a recipe is asked for)")
    recipes.add_argument("name", nargs="?", help="print this recipe's YAML (to copy and edit)")
    recipes.set_defaults(func=cmd_recipes)
    push = sub.add_parser("push", help="upload a saved model folder and its model card to the Hugging Face Hub")
    push.add_argument("--model", required=True, help="a folder written by save_pretrained / lilt train")
    push.add_argument("--repo", required=True, help="the Hub repo id, USER/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--eval", help="first put these `lilt eval` results (its --out folder or eval.json) on the "
                      "model card")
    push.set_defaults(func=cmd_push)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lilt` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except LiltError as err:
        # One line: the message names the bad value and the fix; a traceback would only bury it.
        print(f"lilt {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
