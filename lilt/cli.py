"""`lilt` command line: info | demo (train, eval, embed, curate and grow arrive with their issues)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config import DEFAULT_TEXT, DEFAULT_VISION, ConfigError


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
    """Load the packaged backbones offline, show they work, print budgets, save a checkpoint."""
    from .demo import run_demo

    return run_demo(Path(args.output_dir), args.recipe_dir)


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

    demo = sub.add_parser("demo", help="end-to-end run on the packaged backbones (offline)")
    demo.add_argument("--output-dir", default="demo-out", help="where the checkpoint goes (default demo-out)")
    demo.add_argument("--recipe-dir", default="recipes/methods", help="recipes whose budgets to print")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lilt` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"lilt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
