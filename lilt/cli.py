"""`lilt` command line: train | info | demo (eval, embed, curate and grow arrive with their issues)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config import DEFAULT_TEXT, DEFAULT_VISION, ConfigError, DataError


def cmd_info(args: argparse.Namespace) -> int:
    """Print the budget table of a recipe applied to the given (or default) backbones."""
    import lilt

    if args.methods:
        for spec in lilt.METHODS.values():
            print(f"{spec.name:<10} {spec.summary}")
            for name, text in spec.options.field_help().items():
                print(f"{'':<12}{name}: {text}")
        return 0
    if not args.recipe:
        raise ConfigError("lilt info needs --recipe FILE (e.g. recipes/methods/lwa.yaml), or --methods.")
    model = lilt.DualEncoder.from_backbones(args.vision, args.text)
    lilt.apply_plan(model, args.recipe)
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
    import torch

    import lilt
    from .config import DataConfig, ModelConfig, TrainConfig, apply_overrides, read_mapping
    from .training import train

    recipe = apply_overrides(read_mapping(args.recipe), args.overrides)
    if args.output_dir:
        recipe.setdefault("train", {})["output_dir"] = args.output_dir
    lilt.TuningPlan.from_dict(recipe.get("plan", {}), where=f"{args.recipe}:plan")  # fail before loading weights
    train_config = TrainConfig.from_dict(recipe.get("train", {}), where=f"{args.recipe}:train")
    data_config = DataConfig.from_dict(recipe.get("data", {}), where=f"{args.recipe}:data")
    torch.manual_seed(train_config.seed)  # the same fresh heads and adapters on every process
    model = lilt.DualEncoder(ModelConfig.from_dict(recipe.get("model", {}), where=f"{args.recipe}:model"))
    lilt.apply_plan(model, lilt.TuningPlan.from_dict(recipe["plan"], where=f"{args.recipe}:plan"))
    result = train(model, data_config, train_config)
    if result.metrics:
        print(json.dumps({k: round(v, 2) for k, v in result.metrics.items() if k.endswith("R@1")}, indent=1))
    print(f"{result.steps} steps, {result.samples_per_second:.1f} samples/s, {result.bad_items} unreadable items "
          f"skipped; model saved to {result.output_dir / 'model'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `lilt` command."""
    parser = argparse.ArgumentParser(prog="lilt", description="Parameter-efficient contrastive alignment of "
                                     "frozen vision and language backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="budget table of a recipe's plan on the given backbones")
    info.add_argument("--recipe", help="YAML/JSON recipe with a plan: section")
    info.add_argument("--vision", default=DEFAULT_VISION, help=f"vision backbone (default {DEFAULT_VISION})")
    info.add_argument("--text", default=DEFAULT_TEXT, help=f"text backbone (default {DEFAULT_TEXT})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--methods", action="store_true", help="list the tuning methods and their options")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a recipe (also under `accelerate launch -m lilt.cli train`)")
    train.add_argument("--recipe", required=True, help="YAML/JSON recipe with model/plan/train/data sections")
    train.add_argument("--output-dir", help="overrides train.output_dir")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides, e.g. train.steps=200 data.langs=[en,sw] model.vision.image_size=128")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="end-to-end run on the packaged backbones (offline)")
    demo.add_argument("--output-dir", default="demo-out", help="results, plot and model (default demo-out)")
    demo.add_argument("--recipe", default="recipes/demo.yaml", help="the demo's recipe (default recipes/demo.yaml)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.steps=50")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lilt` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, DataError) as err:
        print(f"lilt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
