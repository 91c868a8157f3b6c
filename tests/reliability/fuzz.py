"""Reliability fuzzers of issue 11: mutated recipes through `lilt train`, damaged checkpoints through
`DualEncoder.from_pretrained`, `lilt eval`, `lilt grow` and resume.

Every case declares what is acceptable: `reject` (an invalid input: it must end in a clean error),
`run` (a valid input: it must run to exit code 0, and pass the case's check), or both. A result is

- clean: `lilt <cmd>` exited 2 with exactly one non-empty stderr line `lilt <cmd>: error: ...` that names
  the mutated key (its last path component) or value; for `from_pretrained`, an exception that is a
  `lilt.LiltError` (before that class exists: ConfigError, DataError, BackboneMismatchError or
  FileNotFoundError) whose message is one line naming the key;
- unclear: a clean-looking error that is several lines long or does not name the key;
- traceback: any other exception or exit code (including a worker that died);
- accepted silently: an input that must be rejected ran to exit code 0 (or from_pretrained returned a model),
  a run that did not pass its check (e.g. resumed from the wrong checkpoint), or anything that executed
  planted code (a `modeling_*.py` or a pickle that writes a marker file);
- hang: no result within the per-case timeout (or the worker outgrew the memory limit);
- valid: an acceptable run; rejected valid: a clean error for an input that must run.

Importing torch costs seconds, so one worker process runs the cases one after another (`lilt.cli.main` or
`from_pretrained` in-process, stderr captured, every exception caught); the parent kills the worker's process
group and starts a new one when a case exceeds its timeout. The parent never imports torch.

    python tests/reliability/fuzz.py recipes [--json OUT] [--seed 11] [--timeout 30] [--limit N]
    python tests/reliability/fuzz.py checkpoints [--json OUT] [--markdown OUT] [--only TEXT] [--keep --root DIR]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

CLEAN, UNCLEAR, TRACEBACK, SILENT, HANG, VALID, REJECTED = (
    "clean", "unclear", "traceback", "accepted silently", "hang", "valid", "rejected valid")
OUTCOMES = (CLEAN, UNCLEAR, TRACEBACK, SILENT, HANG, VALID, REJECTED)
BAD = (UNCLEAR, TRACEBACK, SILENT, HANG, REJECTED)

DEFAULT_SEED = 11
DEFAULT_TIMEOUT = float(os.environ.get("LILT_FUZZ_TIMEOUT", 30))
MEMORY_LIMIT = int(os.environ.get("LILT_FUZZ_MEMORY_MB", 4096)) * 2**20
NAN, INF = float("nan"), float("inf")
HUGE_INT, HUGE_FLOAT = 10**12, 1e12


@dataclass
class Case:
    """One fuzz case: what to set up, what to run, and which outcomes are acceptable."""

    id: str
    group: str                       # the family of mutation (unknown key, non-finite number, ...)
    ok: tuple[str, ...]              # acceptable: "reject" and/or "run"
    names: list[str] = field(default_factory=list)  # a clean error must contain one of these (word match)
    surface: str = "train"           # train | eval | grow | resume | from_pretrained
    argv: list[str] = field(default_factory=list)   # for CLI surfaces; {case} is the case folder
    files: dict[str, str] = field(default_factory=dict)  # name -> base64 bytes, written into the case folder
    damage: str = ""                 # checkpoint cases: the damage applied to a copy of the base run
    target: str = ""                 # checkpoint cases: "model" (run/model) or "step" (run/checkpoints/step-2)
    resumed_from: int | None = None  # resume cases that run: the checkpoint step they must continue from
    hint: str | None = None          # unknown keys: the accepted key a did-you-mean should offer
    marker: bool = False             # planted code or pickles: the marker file must never appear

    @property
    def invalid(self) -> bool:
        return "run" not in self.ok

    @property
    def command(self) -> str:
        return "from_pretrained" if self.surface == "from_pretrained" else self.argv[0]


@dataclass
class Result:
    """What a case did and how it is classified."""

    id: str
    surface: str
    group: str
    invalid: bool
    outcome: str
    line: str            # the first line of the error (or a note for silent acceptances and hangs)
    cause: str           # grouping key for the to-do list
    seconds: float
    detail: str = ""     # traceback tail or stderr, for the JSON output
    note: str = ""


# ---------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------

LWA_PLAN = {"name": "lwa", "rules": [
    {"tower": "both", "method": "adapter", "layers": "all", "options": {"reduction_factor": 4, "placement": "serial"}},
    {"tower": "both", "method": "layernorm", "layers": "all"}]}


def base_recipe(root: Path) -> dict[str, Any]:
    """The tiny recipe every mutation starts from (2 steps on the 2-block ViT and BERT of tests/tiny.py)."""
    return {
        "model": {"vision": {"name": str(root / "backbones" / "vit"), "image_size": 32},
                  "text": {"name": str(root / "backbones" / "bert")}, "embed_dim": 16},
        "plan": copy.deepcopy(LWA_PLAN),
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "report_to": [], "warmup_steps": 1, "lr": 1e-3,
                  "betas": [0.9, 0.999], "output_dir": "out"},
        "data": {"source": "builtin:tiny-random", "num_workers": 0, "options": {"n": 32}},
    }


def _growth_recipe(root: Path) -> dict[str, Any]:
    recipe = base_recipe(root)
    recipe["train"]["growth"] = [{"steps": 1, "data": 0.5}, {"steps": 1, "data": 1.0, "grow": ["depth:text:1"]}]
    return recipe


def _rule_recipe(root: Path, rule: dict[str, Any]) -> dict[str, Any]:
    recipe = base_recipe(root)
    recipe["plan"]["rules"] = [rule]
    return recipe


DELETE = object()


def _path(text: str) -> list[Any]:
    """'plan.rules[0].options.r' -> ['plan', 'rules', 0, 'options', 'r']."""
    out: list[Any] = []
    for part in text.split("."):
        name, *indices = part.split("[")
        out.append(name)
        out += [int(i.rstrip("]")) for i in indices]
    return out


def _set(data: Any, path: str, value: Any) -> Any:
    data = copy.deepcopy(data)
    *parents, leaf = _path(path)
    node = data
    for part in parents:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


def _leaf(path: str) -> str:
    return str([p for p in _path(path) if isinstance(p, str)][-1])


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode("utf-8") if isinstance(data, str) else data).decode("ascii")


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _scalar(value: Any) -> str:
    """A value as the right-hand side of a KEY=VALUE override (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _typo(word: str, rng: random.Random, avoid: Iterable[str]) -> str:
    """A misspelling a did-you-mean should catch: a swapped, dropped, doubled or substituted letter."""
    avoid = set(avoid)
    for _ in range(50):
        i = rng.randrange(len(word))
        kind = rng.choice(["swap", "drop", "double", "sub"] if len(word) > 3 else ["double", "sub"])
        if kind == "swap" and i < len(word) - 1 and word[i] != word[i + 1]:
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif kind == "drop":
            typo = word[:i] + word[i + 1:]
        elif kind == "double":
            typo = word[:i] + word[i] + word[i:]
        else:
            typo = word[:i] + rng.choice("aeiourstnx") + word[i + 1:]
        if typo != word and typo not in avoid and typo.strip("_"):
            return typo
    return word + "x"


# Numeric knobs: path, int or float, optional (None allowed), and which values are valid. Each is probed with
# 0, -1, a huge value, non-finite numbers and (ints) a fraction. `skip` leaves out probes that are legitimate but
# would only make the fuzzer slow (a huge step count is a long run, not an error) or unsafe on a CI machine
# (a huge num_workers forks that many processes).
def fin(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class Knob:
    path: str
    kind: type
    valid: Callable[[Any], bool]
    optional: bool = False
    skip: tuple[str, ...] = ()
    base: str = "base"          # base | growth | lora | deep | ia3 (which recipe the path lives in)


NUMERIC_KNOBS = [
    Knob("model.embed_dim", int, lambda v: 1 <= v <= 65536),
    Knob("model.init_temperature", float, lambda v: fin(v) and 0.001 <= v <= 0.5),
    Knob("model.min_temperature", float, lambda v: fin(v) and 0 < v <= 0.07),
    Knob("model.max_temperature", float, lambda v: fin(v) and v >= 0.07),
    Knob("model.logit_bias", float, fin, optional=True),
    Knob("model.vision.image_size", int, lambda v: 8 <= v <= 4096, optional=True),
    Knob("model.text.max_length", int, lambda v: 2 <= v <= 64, optional=True),  # the tiny BERT has 64 positions
    Knob("data.max_pairs", int, lambda v: v >= 1, optional=True),
    Knob("data.pairs_per_lang", int, lambda v: v >= 3, optional=True),  # 3 languages x 3 >= batch 8
    Knob("data.num_workers", int, lambda v: 0 <= v <= 64, skip=("huge",)),
    Knob("data.max_bad_fraction", float, lambda v: fin(v) and 0 <= v <= 1),
    Knob("train.steps", int, lambda v: v >= 1, skip=("huge",)),
    Knob("train.batch_size", int, lambda v: 1 <= v <= 32),  # 32 pairs of data
    Knob("train.accumulation_steps", int, lambda v: v >= 1 and 8 % v == 0),
    # AdamW with lr or weight decay above 10 is out of range (a typo, not a setting): lilt refuses it.
    Knob("train.lr", float, lambda v: fin(v) and 0 <= v <= 10),
    Knob("train.weight_decay", float, lambda v: fin(v) and 0 <= v <= 10),
    Knob("train.warmup_steps", int, lambda v: v >= 0),
    Knob("train.max_grad_norm", float, lambda v: fin(v) and v > 0, optional=True),
    Knob("train.seed", int, lambda v: 0 <= v < 2**32),
    Knob("train.log_every", int, lambda v: v >= 1),
    Knob("train.eval_every", int, lambda v: v >= 0),
    Knob("train.save_every", int, lambda v: v >= 0),
    Knob("train.keep_checkpoints", int, lambda v: v >= 0),
    Knob("train.max_nonfinite_steps", int, lambda v: v >= 0),
    Knob("train.eval_batch_size", int, lambda v: v >= 1),
    Knob("train.head_warmup_epochs", int, lambda v: v >= 0, skip=("huge",)),
    Knob("train.head_warmup_lr", float, lambda v: fin(v) and 0 <= v <= 10),
    Knob("train.ema_decay", float, lambda v: fin(v) and 0 < v < 1, optional=True),
    Knob("train.head_warmup_batch_size", int, lambda v: v >= 1, optional=True),
    Knob("data.lang_sampling", float, lambda v: fin(v) and 0 <= v <= 1, optional=True),
    Knob("data.val_fraction", float, lambda v: fin(v) and 0 < v < 1, optional=True),
    Knob("train.parallel_weight", float, lambda v: fin(v) and 0 <= v <= 100),
    Knob("train.parallel_batch_size", int, lambda v: v >= 1, optional=True),
    Knob("train.ssl_weight", float, lambda v: fin(v) and 0 <= v <= 100),
    Knob("train.ssl_temperature", float, lambda v: fin(v) and 0.001 <= v <= 10),
    Knob("model.vision.mask_ratio", float, lambda v: fin(v) and 0 <= v < 1),  # the base recipe's tower is a ViT
    Knob("train.betas[0]", float, lambda v: fin(v) and 0 <= v < 1),
    Knob("train.betas[1]", float, lambda v: fin(v) and 0 <= v < 1),
    Knob("train.growth[1].steps", int, lambda v: v == 1, base="growth"),
    Knob("train.growth[1].data", float, lambda v: fin(v) and 0.5 <= v <= 1, base="growth"),
    Knob("train.growth[1].search_steps", int, lambda v: v >= 1, base="growth"),
    Knob("train.growth[1].inherit_momentum", float, lambda v: fin(v) and 0 <= v <= 1, base="growth"),
    Knob("plan.rules[0].options.reduction_factor", int, lambda v: 1 <= v <= 32),  # widths are 32
    Knob("plan.rules[0].options.scale", float, fin),
    Knob("plan.rules[0].options.r", int, lambda v: 1 <= v <= 32, base="lora"),
    Knob("plan.rules[0].options.alpha", float, fin, base="lora"),
    Knob("plan.rules[0].options.dropout", float, lambda v: fin(v) and 0 <= v < 1, base="lora"),
    Knob("plan.rules[0].options.num_blocks", int, lambda v: 1 <= v <= 64, base="deep"),
]
NUMERIC_PROBES = {
    int: [("zero", 0), ("negative", -1), ("huge", HUGE_INT), ("fraction", 2.5), ("nan", NAN), ("inf", INF)],
    float: [("nan", NAN), ("inf", INF), ("-inf", -INF), ("zero", 0.0), ("negative", -1.0), ("huge", HUGE_FLOAT)],
}

# Every other field: its kind (for wrong-type probes) and the recipe it lives in.
OTHER_FIELDS = {
    "model.vision.name": "str", "model.vision.pretrained": "bool", "model.vision.model_kwargs": "dict",
    "model.vision.freeze_bn_stats": "bool", "model.vision.channels_last": "bool",
    "model.text.name": "str", "model.text.pooling": "enum", "model.text.prefix": "str?",
    "model.text.model_kwargs": "dict", "model.head_bias": "bool",
    "data.source": "str", "data.split": "str", "data.val_source": "str?", "data.val_split": "str",
    "data.image_column": "str", "data.text_column": "str", "data.lang_column": "str", "data.langs": "list?",
    "data.options": "dict", "data.streaming": "bool", "data.augment": "enum", "data.pin_memory": "bool",
    "train.output_dir": "str", "train.accumulation": "enum", "train.betas": "list", "train.schedule": "enum",
    "train.loss": "enum", "train.local_loss": "bool", "train.mixed_precision": "enum", "train.resume": "str",
    "train.report_to": "list", "train.growth": "list", "train.ssl_augment": "enum",
    "train.growth[1].grow": "list", "train.growth[1].candidates": "list", "train.growth[1].inherit_from": "enum",
    "train.growth[1].width_init": "enum", "train.growth[1].optimizer_state": "enum",
    "train.growth[1].restart_schedule": "bool",
    "plan.rules": "list", "plan.name": "str", "plan.description": "str", "plan.frozen_heads": "list",
    "plan.rules[0].tower": "enum", "plan.rules[0].method": "str", "plan.rules[0].layers": "str",
    "plan.rules[0].options": "dict",
    "plan.rules[0].options.placement": "enum", "plan.rules[0].options.sites": "enum",
    "plan.rules[0].options.activation": "enum", "plan.rules[0].options.zero_init": "bool",
}
WRONG_TYPES = {
    "int": [("str", "abc"), ("list", [1]), ("dict", {"a": 1}), ("bool", True)],
    "float": [("str", "abc"), ("list", [0.5]), ("dict", {"a": 1}), ("bool", True)],
    "str": [("int", 5), ("list", ["a"]), ("dict", {"a": 1})],
    "bool": [("str", "yes"), ("int", 2), ("list", [True])],
    "list": [("str", "abc"), ("dict", {"a": 1}), ("int", 5)],
    "dict": [("str", "abc"), ("list", [1]), ("int", 5)],
    "enum": [("int", 5), ("list", ["a"]), ("dict", {"a": 1})],
}

# Enumerations: every accepted value (valid) and a misspelling of one (invalid, with a did-you-mean).
ENUMS = {
    "model.text.pooling": ["auto", "cls", "mean"],
    "data.augment": ["none", "crop-flip", "crop", "style", "randaugment", "stacked-randaugment"],
    "train.accumulation": ["gradcache", "plain"],
    "train.schedule": ["cosine", "linear", "constant"],
    "train.mixed_precision": ["auto", "no", "bf16"],
    "train.ssl_augment": ["simclr", "crop-flip", "style"],
    "train.growth[1].inherit_from": ["weights"],
    "train.growth[1].width_init": ["split", "zero"],
    "train.growth[1].optimizer_state": ["migrate", "copy", "reset"],
    "plan.rules[0].tower": ["both", "vision", "text"],
    "plan.rules[0].options.placement": ["serial", "parallel"],
    "plan.rules[0].options.sites": ["both", "attention", "mlp"],
    "plan.rules[0].options.activation": ["gelu", "relu", "silu"],
}

SECTIONS = {
    "": ["model", "plan", "train", "data"],
    "model": ["vision", "text", "embed_dim", "head_bias", "init_temperature", "min_temperature", "max_temperature",
              "logit_bias"],
    "model.vision": ["name", "pretrained", "model_kwargs", "image_size", "freeze_bn_stats", "channels_last"],
    "model.text": ["name", "pooling", "prefix", "max_length", "model_kwargs"],
    "data": ["source", "split", "val_source", "val_split", "image_column", "text_column", "lang_column", "langs",
             "pairs_per_lang", "max_pairs", "options", "streaming", "augment", "num_workers", "pin_memory",
             "max_bad_fraction"],
    "train": ["output_dir", "steps", "batch_size", "accumulation_steps", "accumulation", "lr", "weight_decay",
              "betas", "warmup_steps", "schedule", "max_grad_norm", "loss", "local_loss", "mixed_precision", "seed",
              "log_every", "eval_every", "save_every", "keep_checkpoints", "resume", "report_to",
              "max_nonfinite_steps", "eval_batch_size", "head_warmup_epochs", "head_warmup_lr", "growth",
              "ema_decay", "head_warmup_batch_size"],
    "train.growth[1]": ["steps", "data", "grow", "candidates", "search_steps", "inherit_momentum", "inherit_from",
                        "width_init", "optimizer_state", "restart_schedule"],
    "plan": ["rules", "name", "description", "frozen_heads"],
    "plan.rules[0]": ["tower", "method", "layers", "options"],
    "plan.rules[0].options": ["reduction_factor", "placement", "sites", "activation", "scale", "zero_init"],
}


class _Builder:
    """Collects recipe cases; some simple mutations travel as KEY=VALUE overrides instead of a file edit."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root, self.rng, self.cases = root, random.Random(seed), []
        self.bases = {"base": base_recipe(root), "growth": _growth_recipe(root),
                      "lora": _rule_recipe(root, {"tower": "text", "method": "lora", "layers": "all"}),
                      "deep": _rule_recipe(root, {"tower": "text", "method": "deep", "layers": "all"}),
                      "ia3": _rule_recipe(root, {"tower": "text", "method": "ia3", "layers": "all"})}

    def add(self, id: str, group: str, ok: tuple[str, ...], names: list[str], recipe: Any = None, *,
            text: str | bytes | None = None, overrides: list[str] = (), suffix: str = ".yaml",
            hint: str | None = None, argv: list[str] | None = None, marker: bool = False) -> None:
        name = f"recipe{suffix}"
        if text is None:
            text = json.dumps(recipe) if suffix == ".json" else _yaml(recipe)
        files = {name: _b64(text)}
        argv = argv if argv is not None else ["train", "--recipe", "{case}/" + name, *overrides]
        self.cases.append(Case(f"recipe/{id}", group, ok, names, "train", argv, files, hint=hint, marker=marker))

    def mutate(self, id: str, group: str, ok: tuple[str, ...], path: str, value: Any, *, base: str = "base",
               names: list[str] | None = None, hint: str | None = None, via_override: bool | None = None) -> None:
        """Set `path` to `value` in a base recipe, by editing the file or (sometimes) by an override."""
        simple = "[" not in path and base == "base" and value is not DELETE
        if via_override is None:
            via_override = simple and self.rng.random() < 0.3
        names = names if names is not None else [_leaf(path)]
        if via_override:
            self.add(id + " (override)", group, ok, names, self.bases[base],
                     overrides=[f"{path}={_scalar(value)}"], hint=hint)
        else:
            self.add(id, group, ok, names, _set(self.bases[base], path, value), hint=hint)


REJECT, RUN, EITHER = ("reject",), ("run",), ("reject", "run")


def recipe_cases(root: Path, seed: int = DEFAULT_SEED) -> list[Case]:
    """The mutated recipes (reproducible for a seed); backbones are expected under root/backbones."""
    b = _Builder(root, seed)
    rng = b.rng
    b.add("base", "control", RUN, [], b.bases["base"])
    b.add("base-growth", "control", RUN, [], b.bases["growth"])

    # -- numeric knobs: out of range, non-finite, huge, fractions for ints
    for knob in NUMERIC_KNOBS:
        for label, value in NUMERIC_PROBES[knob.kind]:
            if label in knob.skip:
                continue
            if knob.kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
                valid = False
            else:
                valid = bool(knob.valid(value)) if fin(value) or knob.kind is float else False
            group = ("non-finite number" if isinstance(value, float) and not math.isfinite(value) else
                     "fraction for an integer" if label == "fraction" else
                     "huge number" if label == "huge" else "out-of-range number")
            if valid:
                group = "valid number"
            b.mutate(f"{knob.path}={label}", group, RUN if valid else REJECT, knob.path, value, base=knob.base)
        if knob.optional:
            b.mutate(f"{knob.path}=null", "valid number", RUN, knob.path, None, base=knob.base)
        for label, value in rng.sample(WRONG_TYPES[knob.kind.__name__], 1):
            b.mutate(f"{knob.path}={label}", "wrong type", REJECT, knob.path, value, base=knob.base)
        if knob.kind is float and knob.base == "base":
            b.mutate(f"{knob.path}=nan-string", "non-finite number", REJECT, knob.path, "nan")
        if not knob.optional and knob.base == "base" and "[" not in knob.path:
            b.mutate(f"{knob.path}=null", "wrong type", REJECT, knob.path, None)

    # -- other fields: wrong types, null where not optional
    for path, kind in OTHER_FIELDS.items():
        base = "growth" if path.startswith("train.growth[") else "base"
        optional = kind.endswith("?")
        for label, value in rng.sample(WRONG_TYPES[kind.rstrip("?")], 1):
            b.mutate(f"{path}={label}", "wrong type", REJECT, path, value, base=base)
        if not optional:
            b.mutate(f"{path}=null", "wrong type", REJECT, path, None, base=base)

    # -- enumerations
    for path, values in ENUMS.items():
        base = "growth" if path.startswith("train.growth[") else "base"
        for value in values:
            b.mutate(f"{path}={value}", "valid enum", RUN, path, value, base=base)
        wrong = _typo(values[-1], rng, values)
        b.mutate(f"{path}={wrong}", "bad enum value", REJECT, path, wrong, base=base, names=[_leaf(path), wrong],
                 hint=values[-1])

    # -- unknown keys at every level: a misspelt accepted key (did-you-mean) and a foreign one
    for section, keys in SECTIONS.items():
        base = "growth" if section.startswith("train.growth[") else "base"
        for key in rng.sample(keys, min(len(keys), 4)):
            typo = _typo(key, rng, keys)
            path = f"{section}.{typo}" if section else typo
            node = b.bases[base]
            for part in _path(section) if section else []:
                node = node[part]
            value = copy.deepcopy(node.get(key, 1)) if isinstance(node, dict) else 1
            b.mutate(f"{path} (typo of {key})", "unknown key", REJECT, path, value, base=base, names=[typo],
                     hint=key, via_override=False)
        path = f"{section}.bogus_key" if section else "bogus_key"
        b.mutate(f"{path}", "unknown key", REJECT, path, 1, base=base, names=["bogus_key"])
    b.mutate("eval section", "valid section", RUN, "eval", {"langs": ["en", "sw"]})
    b.mutate("growth section at the top level", "unknown key", REJECT, "growth",
             [{"steps": 1}, {"steps": 1, "grow": ["depth:text:1"]}], names=["growth"])
    for option in ("n", "image_size", "seed"):
        typo = _typo(option, rng, ["n", "image_size", "seed"]) + ("_" if len(option) == 1 else "")
        b.mutate(f"data.options.{typo} (typo of {option})", "unknown key", REJECT, f"data.options.{typo}", 8,
                 names=[typo], hint=None if len(option) == 1 else option, via_override=False)

    # -- values a type check cannot catch
    semantic = [
        ("model.vision.name", "", "empty name"), ("model.vision.name", "no-such-timm-model", "unknown backbone"),
        ("model.vision.name", "/nonexistent/vit", "missing folder"),
        ("model.vision.name", "packaged:no-such-model", "unknown packaged"),
        ("model.vision.name", str(root / "backbones" / "bert"), "text backbone as vision"),
        ("model.text.name", "", "empty name"), ("model.text.name", "/nonexistent/bert", "missing folder"),
        ("model.text.name", str(root / "backbones" / "vit"), "vision backbone as text"),
        ("model.text.name", "packaged:efficientnet-lite0", "vision packaged as text"),
        ("model.vision.model_kwargs", {"bogus_kwarg": 1}, "unknown model kwarg"),
        ("model.text.model_kwargs", {"bogus_kwarg": 1}, "unknown model kwarg"),
        ("model.text.model_kwargs", {"trust_remote_code": True}, "remote code"),
        ("data.source", "builtin:no-such-source", "unknown source"), ("data.source", "/nonexistent/pairs", "missing"),
        ("data.source", "", "empty source"),
        ("data.split", "no-such-split", "unknown split"), ("data.val_split", "no-such-split", "unknown split"),
        ("data.val_source", "builtin:no-such-source", "unknown source"),
        ("data.image_column", "no_such_column", "unknown column"),
        ("data.text_column", "no_such_column", "unknown column"),
        ("data.langs", [], "empty language list"), ("data.langs", ["zz"], "unknown language"),
        ("data.langs", "en", "string for a list"), ("data.pairs_per_lang", {"sw": -5}, "negative cap"),
        ("data.pairs_per_lang", {"sw": "abc"}, "wrong type in a mapping"),
        ("data.pairs_per_lang", {"zz": 5}, "unknown language"), ("data.pairs_per_lang", {"sw": 2.5}, "fraction"),
        ("data.options", {"n": -5}, "negative size"), ("data.options", {"n": 0}, "zero size"),
        ("data.options", {"n": HUGE_INT}, "huge size"), ("data.options", {"n": "abc"}, "wrong type in a mapping"),
        ("data.options", {"image_size": 0}, "zero image size"),
        ("train.betas", [0.9], "one beta"), ("train.betas", [0.9, 0.99, 0.999], "three betas"),
        ("train.betas", [1.0, 0.999], "beta of 1"), ("train.betas", [0.9, 1.5], "beta above 1"),
        ("train.report_to", ["no-such-tracker"], "unknown tracker"), ("train.report_to", "tensorboard", "string"),
        ("train.resume", "/nonexistent/checkpoint", "missing checkpoint"),
        ("train.output_dir", "", "empty output dir"),
        ("train.loss", "siglip", "siglip without logit_bias"),
        ("train.ema_decay", 1.0, "decay of 1"),
        ("plan.rules", {"tower": "both"}, "mapping for a list"),
        ("plan.frozen_heads", ["no-such-head"], "unknown head"),
        ("plan.rules[0].method", "", "empty method"),
        ("plan.rules[0].options", {"r": 8}, "option of another method"),
        ("plan.rules[1].options", {"reduction_factor": 4}, "option for an option-less method"),
    ]
    for path, value, label in semantic:
        names = [_leaf(path)] + ([value, value.removeprefix("builtin:")] if isinstance(value, str) and value else [])
        if isinstance(value, dict):
            names += [str(k) for k in value]
        if path == "train.loss":
            names.append("logit_bias")
        b.mutate(f"{path}: {label}", "bad value", REJECT, path, value, names=names)
    b.mutate("train.mixed_precision=fp16 (on a CPU: run or refuse)", "bad value", EITHER, "train.mixed_precision",
             "fp16", names=["mixed_precision", "fp16"])
    b.add("train.loss=siglip with logit_bias", "valid enum", RUN, [],
          _set(_set(b.bases["base"], "train.loss", "siglip"), "model.logit_bias", -10.0))
    for path, value, label in [("data.langs", ["en", "sw"], "two languages"), ("data.pairs_per_lang", {"sw": 4}, "cap"),
                               ("data.num_workers", 1, "one worker"), ("train.ema_decay", 0.9, "ema"),
                               ("train.head_warmup_epochs", 1, "head warm-up"), ("train.save_every", 1, "save"),
                               ("train.eval_every", 1, "eval"), ("train.accumulation_steps", 2, "accumulation"),
                               ("model.text.model_kwargs", {"hidden_dropout_prob": 0.0}, "kwarg"),
                               ("data.val_source", "builtin:tiny-random", "val source"),
                               ("train.resume", "never", "never"), ("plan.frozen_heads", ["vision"], "frozen head"),
                               ("model.text.max_length", 16, "shorter"), ("data.max_pairs", 16, "cap")]:
        b.mutate(f"{path}: {label}", "valid value", RUN, path, value)

    # -- plan rules: unknown method, bad layers, options of other methods, per-method options
    layers_bad = ["top:0", "top:99", "bottom:-1", "blocks.7", "blocks.1-0", "blocks.a", "no_such_param*", "",
                  "blocks.0-99"]
    for spec in layers_bad:
        b.mutate(f"plan.rules[0].layers={spec!r}", "bad plan rule", REJECT, "plan.rules[0].layers", spec,
                 names=["layers"] + ([spec] if spec else []))
    for spec in ["top:1", "bottom:1", "blocks.0", "blocks.0-1", "blocks.0,1"]:
        b.mutate(f"plan.rules[0].layers={spec!r}", "valid plan rule", RUN, "plan.rules[0].layers", spec)
    b.mutate("plan.rules[0].method=adapterr", "bad plan rule", REJECT, "plan.rules[0].method", "adapterr",
             names=["adapterr"], hint="adapter")
    b.mutate("plan.rules[0].method=no_such_method", "bad plan rule", REJECT, "plan.rules[0].method",
             "no_such_method", names=["no_such_method"])
    b.mutate("plan.rules=[]", "valid plan rule", RUN, "plan.rules", [])
    for method, options, names in [("lora", {"reduction_factor": 4}, ["reduction_factor"]),
                                   ("lora", {"target_modules": ["no_such_module"]}, ["no_such_module"]),
                                   ("lora", {"target_modules": "query"}, ["target_modules"]),
                                   ("lora", {"target_modules": []}, ["target_modules"]),
                                   ("ia3", {"target_modules": ["no_such_module"]}, ["no_such_module"]),
                                   ("ia3", {"target_modules": ["attention.self.query", "intermediate.dense"],
                                            "feedforward_modules": ["attention.self.value"]},
                                    ["feedforward_modules", "attention.self.value"]),
                                   ("deep", {"init": "bogus"}, ["init", "bogus"]),
                                   ("deep", {"num_blocks": 100000}, ["num_blocks"]),
                                   ("unlock", {"what": "bogus"}, ["what", "bogus"]),
                                   ("bitfit", {"x": 1}, ["x"]), ("lock", {"scale": 1}, ["scale"]),
                                   ("layernorm", {"r": 1}, ["r"])]:
        rule = {"tower": "text", "method": method, "layers": "all", "options": options}
        b.add(f"plan rule {method} {json.dumps(options)}", "bad plan rule", REJECT, names,
              _rule_recipe(root, rule))
    b.add("plan rule deep layers=top:1", "bad plan rule", REJECT, ["layers", "top:1"],
          _rule_recipe(root, {"tower": "text", "method": "deep", "layers": "top:1"}))
    for method, options in [("lora", {}), ("lora", {"target_modules": ["*.query", "*.value"]}), ("ia3", {}),
                            ("ia3", {"target_modules": ["attention.self.key", "output.dense"],
                                     "feedforward_modules": ["output.dense"]}),
                            ("deep", {}), ("deep", {"init": "random"}), ("unlock", {"what": "attention"}),
                            ("bitfit", {}), ("lock", {}), ("layernorm", {})]:
        b.add(f"plan rule {method} {json.dumps(options)}", "valid plan rule", RUN, [],
              _rule_recipe(root, {"tower": "text", "method": method, "layers": "all", "options": options}))
    b.mutate("missing plan", "missing section", REJECT, "plan", DELETE, names=["plan"])
    b.mutate("missing plan.rules", "valid plan rule", RUN, "plan.rules", DELETE)
    b.mutate("plan is a list", "wrong type", REJECT, "plan", [LWA_PLAN["rules"][0]], names=["plan"])
    b.mutate("plan=null", "wrong type", REJECT, "plan", None, names=["plan"])
    b.mutate("plan is a string", "wrong type", REJECT, "plan", "lwa", names=["plan"])
    for section in ("model", "train", "data"):
        b.mutate(f"{section} is a list", "wrong type", REJECT, section, [1, 2], names=[section])
        b.mutate(f"{section}=null", "wrong type", REJECT, section, None, names=[section])
    b.mutate("init from a missing folder", "bad value", REJECT, "init", {"from": "/nonexistent/model"},
             names=["init", "from", "/nonexistent/model"])
    b.mutate("init with a misspelt key", "unknown key", REJECT, "init", {"form": "/nonexistent/model"},
             names=["form"], hint="from")
    b.mutate("init is a string", "wrong type", REJECT, "init", "abc", names=["init"])

    # -- growth ops in stages
    growth_ops = [("depth:text:100000", False), ("depth:text:0", False), ("depth:text:-1", False),
                  ("width:adapter:1e9", False), ("width:adapter:nan", False), ("width:adapter:inf", False),
                  ("width:adapter:1", False), ("shared:1:100000000", False), ("shared:100000:8", False),
                  ("shared:0:8", False), ("depth:bogus:1", False), ("bogus", False), ("depth:text:1:sideways", False),
                  ("width:lora:2", False), ("width:adapter:2", True), ("depth:vision:1:interleave", True),
                  ("shared:1:16", True), ("width:heads:2", True), ("depth:shared:1", False)]
    for spec, valid in growth_ops:
        b.mutate(f"growth op {spec}", "valid growth op" if valid else "bad growth op", RUN if valid else REJECT,
                 "train.growth[1].grow", [spec], base="growth", names=["grow", spec, spec.rsplit(":", 1)[0]])
    search = _set(_set(b.bases["growth"], "train.steps", 4), "train.growth[1]",
                  {"steps": 3, "data": 1.0, "search_steps": 1, "candidates": ["depth:text:1", "width:adapter:2"]})
    b.add("growth candidates (a search)", "valid growth op", RUN, [], search)
    for spec in ["depth:text:100000", "bogus", "width:adapter:nan"]:
        b.add(f"growth candidate {spec}", "bad growth op", REJECT, ["candidates", spec],
              _set(search, "train.growth[1].candidates", [spec, "depth:text:1"]))
    b.mutate("growth stages do not add up", "bad value", REJECT, "train.steps", 3, base="growth", names=["steps"])
    b.mutate("growth data shrinks", "bad value", REJECT, "train.growth[1].data", 0.25, base="growth",
             names=["data", "0.25"])
    b.mutate("growth data from a missing source", "bad value", REJECT, "train.growth[1].data", "builtin:nope",
             base="growth", names=["data", "builtin:nope"])
    b.mutate("growth inherit_from=ema without ema_decay", "bad value", REJECT, "train.growth[1].inherit_from",
             "ema", base="growth", names=["inherit_from", "ema_decay"])
    b.mutate("growth stage is a string", "wrong type", REJECT, "train.growth[1]", "depth:text:1", base="growth",
             names=["growth"])

    # -- KEY=VALUE overrides
    overrides = [
        (["train.steps"], REJECT, ["train.steps"]), (["=5"], REJECT, ["=5"]),
        (["train.stpes=2"], REJECT, ["stpes"]), (["trian.steps=2"], REJECT, ["trian"]),
        (["train.steps=abc"], REJECT, ["steps"]), (["train.steps.x=1"], REJECT, ["steps"]),
        (["train=5"], REJECT, ["train"]), (["model.vision=null"], REJECT, ["vision"]),
        (["data.pairs_per_lang={sw:", "300}"], REJECT, ["pairs_per_lang"]),
        (["data.langs=[en,"], REJECT, ["langs"]), (["train.lr=nan"], REJECT, ["lr"]),
        (["train.lr=.inf"], REJECT, ["lr"]), (["train.lr=1e-3", "train.lr=abc"], REJECT, ["lr"]),
        (["train.lr=!!python/object/apply:os.system [true]"], REJECT, ["lr"]),
        (["plan=null"], REJECT, ["plan"]), ([".steps=2"], REJECT, [".steps"]), (["train..steps=2"], REJECT, ["steps"]),
        (["train.lr=1e-3"], RUN, []), (["data.langs=[en,sw]"], RUN, []), (["data.pairs_per_lang={sw: 4}"], RUN, []),
        (["train.steps=1"], RUN, []), (["plan.rules=[]"], RUN, []), (["train.betas=[0.8,0.99]"], RUN, []),
        (["model.text.max_length=16"], RUN, []), (["train.lr=2e-3", "train.lr=1e-3"], RUN, []),
    ]
    for items, ok, names in overrides:
        b.add(f"override {' '.join(items)}", "bad override" if ok == REJECT else "valid override", ok, names,
              b.bases["base"], overrides=items)

    # -- recipe files
    good = _yaml(b.bases["base"])
    marker = "{case}/MARKER"
    files = [
        ("non-UTF-8 recipe", ("# caf\xe9 recipe\n" + good).encode("latin-1"), ["UTF-8", "utf-8", "encoding"]),
        ("UTF-16 recipe", good.encode("utf-16"), ["UTF-8", "utf-8", "encoding"]),
        ("empty recipe", b"", ["empty", "mapping"]), ("comments-only recipe", b"# nothing\n", ["empty", "mapping"]),
        ("list recipe", b"- train\n- data\n", ["mapping"]), ("scalar recipe", b"just text\n", ["mapping"]),
        ("binary recipe", bytes(range(256)) * 4, ["UTF-8", "utf-8", "YAML", "binary"]),
        ("YAML syntax error", (good + "train: {steps: [\n").encode(), ["YAML"]),
        ("tab-indented recipe", good.replace("  ", "\t").encode(), ["YAML"]),
        ("duplicate section", (good + "train: {steps: 1}\n").encode(), ["train", "duplicate"]),
        ("python tag in recipe", (good + f"evil: !!python/object/apply:os.system ['touch {marker}']\n").encode(),
         ["python", "evil", "YAML"]),
    ]
    for label, data, names in files:
        b.add(label, "bad recipe file", REJECT, names, text=data, marker="python tag" in label)
    b.add("UTF-8 BOM recipe", "valid recipe file", RUN, [], text=("\ufeff" + good).encode("utf-8"))
    b.add("JSON recipe", "valid recipe file", RUN, [], b.bases["base"], suffix=".json")
    b.add("broken JSON recipe", "bad recipe file", REJECT, ["JSON"], text=json.dumps(b.bases["base"])[:-5],
          suffix=".json")
    b.add("JSON recipe with NaN", "non-finite number", REJECT, ["lr"], text=json.dumps(
        _set(b.bases["base"], "train.lr", NAN)), suffix=".json")
    b.add("missing recipe file", "bad recipe file", REJECT, ["no-such-recipe.yaml"], text="",
          argv=["train", "--recipe", "{case}/no-such-recipe.yaml"])
    b.add("recipe is a folder", "bad recipe file", REJECT, ["folder", "directory"], text="",
          argv=["train", "--recipe", "{case}"])
    return b.cases


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Damage:
    """A damage to a copy of the base run, applied to `folder` (run/model, or run/checkpoints/step-2 for resume)."""

    name: str
    group: str
    apply: Callable[["DamageContext"], None]
    model: tuple[str, ...]           # acceptable outcomes for from_pretrained / eval / grow
    resume: tuple[str, ...] | None   # acceptable outcomes for resume (None: not run through resume)
    names: list[str]
    resumed_from: int = 2            # resume runs that are acceptable continue from this step
    marker: bool = False
    scope: str = "model"             # model: all four surfaces; resume: resume only
    fallback: bool = True            # resume: an older complete checkpoint is left to fall back to


@dataclass
class DamageContext:
    run: Path        # the damaged copy of the base run
    folder: Path     # run/model or run/checkpoints/step-2
    case: Path       # the case folder (the marker lives here)
    root: Path       # the fuzz root (backbones, base run)

    @property
    def marker(self) -> Path:
        return self.case / "MARKER"


class _Evil:
    """Unpickling this creates the marker file (open(path, 'w')); nothing may ever unpickle it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _evil_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(ctx: DamageContext) -> dict[str, Any]:
    return json.loads((ctx.folder / "lilt_config.json").read_text())


def _write_manifest(ctx: DamageContext, data: Any) -> None:
    (ctx.folder / "lilt_config.json").write_text(json.dumps(data, indent=1))


def _edit_manifest(fn: Callable[[dict[str, Any]], Any]) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        data = _manifest(ctx)
        out = fn(data)
        _write_manifest(ctx, data if out is None else out)
    return apply


def _edit_tensors(fn: Callable[[dict[str, Any]], None], file: str = "model.safetensors",
                  rehash: bool = True) -> Callable[[DamageContext], None]:
    """Change the tensors of a safetensors file (and record the new hash when rehash)."""
    def apply(ctx: DamageContext) -> None:
        from safetensors.numpy import load_file, save_file
        path = ctx.folder / file
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        if rehash and file == "model.safetensors":
            data = _manifest(ctx)
            data["weights"]["sha256"] = _sha(path)
            _write_manifest(ctx, data)
    return apply


def _truncate(file: str, keep: float = 0.5) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        path = ctx.folder / file
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
    return apply


def _write(file: str, data: bytes | str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        path = ctx.folder / file
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return apply


def _delete(*files: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        for file in files:
            target = ctx.folder / file
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return apply


def _replace_with_dir(file: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        (ctx.folder / file).unlink()
        (ctx.folder / file).mkdir()
    return apply


def _zero(file: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        path = ctx.folder / file
        path.write_bytes(bytes(path.stat().st_size))
    return apply


def _garbage(file: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        path = ctx.folder / file
        path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    return apply


def _huge_header(ctx: DamageContext) -> None:
    path = ctx.folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**60).to_bytes(8, "little") + data[8:])


def _symlink_devzero(ctx: DamageContext) -> None:
    path = ctx.folder / "model.safetensors"
    path.unlink()
    path.symlink_to("/dev/zero")


def _first_key(tensors: dict[str, Any], part: str = "") -> str:
    return sorted(k for k in tensors if part in k)[0]


def _scale_values(tensors: dict[str, Any]) -> None:
    import numpy as np
    for key in tensors:
        tensors[key] = np.asarray(tensors[key] * 3 + 1, dtype=tensors[key].dtype)


def _nan_values(tensors: dict[str, Any]) -> None:
    import numpy as np
    for key in tensors:
        if tensors[key].dtype.kind == "f":
            tensors[key] = np.full_like(tensors[key], np.nan)


def _wrong_shape(tensors: dict[str, Any]) -> None:
    import numpy as np
    key = _first_key(tensors, "proj.weight")
    tensors[key] = np.zeros((tensors[key].shape[0] + 1, *tensors[key].shape[1:]), dtype=tensors[key].dtype)


def _extra_tensor(tensors: dict[str, Any]) -> None:
    import numpy as np
    tensors["bogus.tensor"] = np.zeros(3, dtype=np.float32)


def _missing_tensor(tensors: dict[str, Any]) -> None:
    del tensors[_first_key(tensors, "proj.weight")]


def _copy_backbone(ctx: DamageContext, which: str) -> Path:
    target = ctx.run / f"{which}-copy"
    shutil.copytree(ctx.root / "backbones" / which, target)
    return target


def _point_text_at(ctx: DamageContext, path: Path | str, **kwargs: Any) -> None:
    data = _manifest(ctx)
    data["model"]["text"]["name"] = str(path)
    data["model"]["text"]["model_kwargs"].update(kwargs)
    _write_manifest(ctx, data)


EVIL_MODELING = """import pathlib
pathlib.Path({marker!r}).write_text("executed modeling_evil.py")
from transformers import BertModel


class EvilModel(BertModel):
    pass
"""


def _evil_backbone(trust: bool) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        folder = _copy_backbone(ctx, "bert")
        (folder / "modeling_evil.py").write_text(EVIL_MODELING.format(marker=str(ctx.marker)))
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        _point_text_at(ctx, folder, **({"trust_remote_code": True} if trust else {}))
    return apply


def _pickle_backbone(which: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        folder = _copy_backbone(ctx, which)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
        _evil_pickle(folder / "pytorch_model.bin", ctx.marker)
        data = _manifest(ctx)
        data["model"]["text" if which == "bert" else "vision"]["name"] = str(folder)
        _write_manifest(ctx, data)
    return apply


def _other_bert(ctx: DamageContext) -> None:
    _point_text_at(ctx, ctx.root / "backbones" / "bert48")


def _plant(file: str) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        _evil_pickle(ctx.folder / file, ctx.marker)
    return apply


def _chain(*fns: Callable[[DamageContext], None]) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        for fn in fns:
            fn(ctx)
    return apply


def _remove_folder(ctx: DamageContext) -> None:
    shutil.rmtree(ctx.folder)


def _folder_is_file(ctx: DamageContext) -> None:
    shutil.rmtree(ctx.folder)
    ctx.folder.write_text("not a folder\n")


def _edit_json(file: str, fn: Callable[[Any], Any]) -> Callable[[DamageContext], None]:
    def apply(ctx: DamageContext) -> None:
        path = ctx.folder / file
        data = json.loads(path.read_text())
        out = fn(data)
        path.write_text(json.dumps(data if out is None else out, indent=1))
    return apply


def _newer_step(kind: str) -> Callable[[DamageContext], None]:
    """A step-3 folder newer than the last complete checkpoint, left incomplete."""
    def apply(ctx: DamageContext) -> None:
        step2, step3 = ctx.run / "checkpoints" / "step-2", ctx.run / "checkpoints" / ("step-3" if kind != "tmp"
                                                                                      else ".tmp-step-3")
        if kind == "empty":
            step3.mkdir()
        elif kind == "state-only":
            step3.mkdir()
            state = json.loads((step2 / "trainer_state.json").read_text())
            state["step"] = 3
            (step3 / "trainer_state.json").write_text(json.dumps(state))
        else:
            shutil.copytree(step2, step3)
            state = json.loads((step2 / "trainer_state.json").read_text())
            state["step"] = 3
            (step3 / "trainer_state.json").write_text(json.dumps(state))
            missing = {"weights": "model.safetensors", "rng": "rng_0.safetensors", "tmp": "trainer_state.json",
                       "optimizer": "optimizer.safetensors"}[kind]
            (step3 / missing).unlink()
    return apply


def _del_key(*keys: str) -> Callable[[dict[str, Any]], None]:
    def fn(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return fn


def _set_key(value: Any, *keys: str) -> Callable[[dict[str, Any]], None]:
    def fn(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return fn


W, C = "model.safetensors", "lilt_config.json"
DAMAGES = [
    Damage("pristine", "control", lambda ctx: None, RUN, RUN, []),
    # weights file
    Damage("weights truncated to half", "damaged weights", _truncate(W), REJECT, REJECT, [W]),
    Damage("weights empty", "damaged weights", _truncate(W, 0), REJECT, REJECT, [W]),
    Damage("weights zeroed", "damaged weights", _zero(W), REJECT, REJECT, [W]),
    Damage("weights garbage", "damaged weights", _garbage(W), REJECT, REJECT, [W]),
    Damage("weights header claims 2**60 bytes", "damaged weights", _huge_header, REJECT, REJECT, [W]),
    Damage("weights edited, hash not updated", "damaged weights", _edit_tensors(_scale_values, rehash=False),
           REJECT, REJECT, [W, "sha256"]),
    Damage("weights all NaN (hash updated)", "damaged weights", _edit_tensors(_nan_values), REJECT, REJECT,
           [W, "nan", "NaN", "finite"]),
    Damage("weights with an extra tensor (hash updated)", "damaged weights", _edit_tensors(_extra_tensor), REJECT,
           REJECT, [W, "bogus.tensor"]),
    Damage("weights missing a tensor (hash updated)", "damaged weights", _edit_tensors(_missing_tensor), REJECT,
           REJECT, [W, "vision_proj.weight", "text_proj.weight"]),
    Damage("weights with a wrong shape (hash updated)", "damaged weights", _edit_tensors(_wrong_shape), REJECT,
           REJECT, [W, "vision_proj.weight", "text_proj.weight", "shape"]),
    Damage("weights deleted", "missing file", _delete(W), REJECT, EITHER, [W], resumed_from=1),
    Damage("weights are a folder", "damaged weights", _replace_with_dir(W), REJECT, REJECT, [W]),
    Damage("weights symlinked to /dev/zero", "damaged weights", _symlink_devzero, REJECT, REJECT, [W]),
    Damage("weights deleted, pytorch_model.bin pickle planted", "planted pickle",
           _chain(_delete(W), _plant("pytorch_model.bin")), REJECT, EITHER, [W], resumed_from=1, marker=True),
    Damage("pytorch_model.bin pickle planted next to the weights", "planted pickle", _plant("pytorch_model.bin"),
           RUN, RUN, [], marker=True),
    # lilt_config.json
    Damage("config deleted", "missing file", _delete(C), REJECT, EITHER, [C], resumed_from=1),
    Damage("config empty", "damaged config", _write(C, ""), REJECT, REJECT, [C]),
    Damage("config truncated JSON", "damaged config", _truncate(C), REJECT, REJECT, [C]),
    Damage("config not UTF-8", "damaged config", _write(C, b'{"format": "lilt-dual-encoder\xff\xfe"}'), REJECT,
           REJECT, [C]),
    Damage("config is a list", "damaged config", _write(C, "[]"), REJECT, REJECT, [C]),
    Damage("config is null", "damaged config", _write(C, "null"), REJECT, REJECT, [C]),
    Damage("config is a folder", "damaged config", _replace_with_dir(C), REJECT, REJECT, [C]),
    Damage("config without model", "config missing a key", _edit_manifest(_del_key("model")), REJECT, EITHER,
           ["model"]),
    Damage("config without backbones", "config missing a key", _edit_manifest(_del_key("backbones")), REJECT,
           EITHER, ["backbones"]),
    Damage("config without weights", "config missing a key", _edit_manifest(_del_key("weights")), REJECT, REJECT,
           ["weights"]),
    Damage("config without weights.sha256", "config missing a key", _edit_manifest(_del_key("weights", "sha256")),
           REJECT, REJECT, ["sha256"]),
    Damage("config without plan", "config missing a key", _edit_manifest(_del_key("plan")), REJECT, EITHER, ["plan"]),
    Damage("config without format", "config missing a key", _edit_manifest(_del_key("format")), REJECT, REJECT,
           ["format"]),
    Damage("config of another format", "config format", _edit_manifest(_set_key("other-format", "format")), REJECT,
           REJECT, ["format", "other-format"]),
    Damage("config format_version 99 (from the future)", "config format",
           _edit_manifest(_set_key(99, "format_version")), REJECT, REJECT, ["format_version", "v99", "99"]),
    Damage("config format_version is a string", "config wrong type", _edit_manifest(_set_key("1", "format_version")),
           REJECT, REJECT, ["format_version"]),
    Damage("config model is a list", "config wrong type", _edit_manifest(_set_key([1], "model")), REJECT, EITHER,
           ["model"]),
    Damage("config model has an unknown key", "config wrong type",
           _edit_manifest(_set_key(16, "model", "embeddim")), REJECT, EITHER, ["embeddim"]),
    Damage("config embed_dim does not match the weights", "config mismatch",
           _edit_manifest(_set_key(32, "model", "embed_dim")), REJECT, EITHER, ["embed_dim", W]),
    Damage("config text model_kwargs trust_remote_code", "remote code",
           _edit_manifest(_set_key({"trust_remote_code": True}, "model", "text", "model_kwargs")), REJECT, EITHER,
           ["trust_remote_code"]),
    Damage("config vision model_kwargs unknown", "config wrong type",
           _edit_manifest(_set_key({"bogus_kwarg": 1}, "model", "vision", "model_kwargs")), REJECT, EITHER,
           ["bogus_kwarg"]),
    Damage("config plan with an unknown method", "config plan",
           _edit_manifest(lambda d: d["plan"]["rules"][0].update(method="adapterr")), REJECT, EITHER, ["adapterr"]),
    Damage("config plan rules is a mapping", "config plan",
           _edit_manifest(_set_key({"tower": "both"}, "plan", "rules")), REJECT, EITHER, ["rules"]),
    Damage("config plan null (weights hold adapters)", "config plan", _edit_manifest(_set_key(None, "plan")), REJECT,
           EITHER, ["plan", W]),
    Damage("config growth depth:text:100000", "config growth",
           _edit_manifest(_set_key([{"op": "depth:text:100000"}], "growth")), REJECT, REJECT,
           ["growth", "depth:text:100000"]),
    Damage("config growth op not understood", "config growth", _edit_manifest(_set_key([{"op": "bogus"}], "growth")),
           REJECT, REJECT, ["growth", "bogus"]),
    Damage("config growth is a string", "config growth", _edit_manifest(_set_key("abc", "growth")), REJECT, REJECT,
           ["growth"]),
    Damage("config weights.sha256 wrong", "config mismatch", _edit_manifest(_set_key("0" * 64, "weights", "sha256")),
           REJECT, REJECT, ["sha256", W]),
    Damage("config text backbone sha256 wrong", "config mismatch",
           _edit_manifest(_set_key("0" * 64, "backbones", "text", "sha256")), REJECT, EITHER, ["sha256", "text"]),
    Damage("config text backbone folder missing", "config mismatch",
           lambda ctx: _point_text_at(ctx, "/nonexistent/bert"), REJECT, EITHER, ["/nonexistent/bert"]),
    Damage("config text backbone is another BERT", "config mismatch", _other_bert, REJECT, EITHER, ["sha256", "text"]),
    Damage("text backbone with auto_map + modeling_evil.py", "remote code", _evil_backbone(False), RUN, RUN, [],
           marker=True),
    Damage("text backbone with auto_map + modeling_evil.py, trust_remote_code", "remote code", _evil_backbone(True),
           REJECT, EITHER, ["trust_remote_code"], marker=True),
    Damage("text backbone with only a pickled pytorch_model.bin", "planted pickle", _pickle_backbone("bert"), REJECT,
           EITHER, ["safetensors"], marker=True),
    Damage("vision backbone with only a pickled pytorch_model.bin", "planted pickle", _pickle_backbone("vit"), REJECT,
           EITHER, ["safetensors"], marker=True),
    Damage("model folder missing", "missing file", _remove_folder, REJECT, RUN, [C, "model"], resumed_from=1),
    Damage("model folder is a file", "missing file", _folder_is_file, REJECT, RUN, [C, "model"], resumed_from=1),
    # resume only: trainer state, optimizer, EMA, RNG, scheduler, step folders
    Damage("trainer_state step 999", "edited trainer state", _edit_json("trainer_state.json", _set_key(999, "step")),
           (), REJECT, ["step", "trainer_state.json", "999"], scope="resume"),
    Damage("trainer_state step -5", "edited trainer state", _edit_json("trainer_state.json", _set_key(-5, "step")),
           (), REJECT, ["step", "trainer_state.json", "-5"], scope="resume"),
    Damage("trainer_state step is a string", "edited trainer state",
           _edit_json("trainer_state.json", _set_key("two", "step")), (), REJECT, ["step", "trainer_state.json"],
           scope="resume"),
    Damage("trainer_state without bad_items", "edited trainer state",
           _edit_json("trainer_state.json", _del_key("bad_items")), (), REJECT, ["bad_items", "trainer_state.json"],
           scope="resume"),
    Damage("trainer_state bad_items is a string", "edited trainer state",
           _edit_json("trainer_state.json", _set_key("abc", "bad_items")), (), REJECT,
           ["bad_items", "trainer_state.json"], scope="resume"),
    Damage("trainer_state truncated JSON", "edited trainer state", _truncate("trainer_state.json"), (), REJECT,
           ["trainer_state.json"], scope="resume"),
    Damage("trainer_state empty", "edited trainer state", _write("trainer_state.json", ""), (), REJECT,
           ["trainer_state.json"], scope="resume"),
    Damage("trainer_state is a list", "edited trainer state", _write("trainer_state.json", "[]"), (), REJECT,
           ["trainer_state.json"], scope="resume"),
    Damage("trainer_state deleted (step-2 incomplete)", "incomplete checkpoint", _delete("trainer_state.json"), (),
           RUN, [], resumed_from=1, scope="resume"),
    Damage("optimizer.safetensors edited", "unhashed state", _edit_tensors(_scale_values, "optimizer.safetensors"),
           (), REJECT, ["optimizer.safetensors"], scope="resume"),
    Damage("optimizer.safetensors truncated", "damaged state", _truncate("optimizer.safetensors"), (), REJECT,
           ["optimizer.safetensors"], scope="resume"),
    Damage("optimizer.safetensors with a wrong shape", "unhashed state",
           _edit_tensors(lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]][:1]), "optimizer.safetensors"), (),
           REJECT, ["optimizer.safetensors"], scope="resume"),
    Damage("optimizer.safetensors deleted", "missing file", _delete("optimizer.safetensors"), (), EITHER,
           ["optimizer.safetensors"], resumed_from=1, scope="resume"),
    Damage("optimizer.safetensors deleted, optimizer.bin pickle planted", "planted pickle",
           _chain(_delete("optimizer.safetensors"), _plant("optimizer.bin")), (), EITHER, ["optimizer.safetensors"],
           resumed_from=1, marker=True, scope="resume"),
    Damage("optimizer.json betas edited", "unhashed state",
           _edit_json("optimizer.json", lambda d: [g.update(betas=[5.0, 5.0]) for g in d["param_groups"]] and None),
           (), REJECT, ["optimizer.json", "betas"], scope="resume"),
    Damage("optimizer.json deleted", "missing file", _delete("optimizer.json"), (), EITHER, ["optimizer.json"],
           resumed_from=1, scope="resume"),
    Damage("ema.safetensors edited", "unhashed state", _edit_tensors(_scale_values, "ema.safetensors"), (), REJECT,
           ["ema.safetensors"], scope="resume"),
    Damage("ema.safetensors truncated", "damaged state", _truncate("ema.safetensors"), (), REJECT,
           ["ema.safetensors"], scope="resume"),
    Damage("ema.safetensors deleted", "missing file", _delete("ema.safetensors"), (), EITHER, ["ema.safetensors"],
           resumed_from=1, scope="resume"),
    Damage("rng_0.safetensors deleted", "missing file", _delete("rng_0.safetensors"), (), EITHER, ["rng_0"],
           resumed_from=1, scope="resume"),
    Damage("rng_0.json deleted", "missing file", _delete("rng_0.json"), (), EITHER, ["rng_0"], resumed_from=1,
           scope="resume"),
    Damage("rng_0.json garbage", "damaged state", _write("rng_0.json", '{"python": 5}'), (), REJECT,
           ["rng_0.json", "python", "numpy"], scope="resume"),
    Damage("rng_0.safetensors truncated", "damaged state", _truncate("rng_0.safetensors"), (), REJECT,
           ["rng_0.safetensors"], scope="resume"),
    Damage("scheduler.json deleted", "missing file", _delete("scheduler.json"), (), EITHER, ["scheduler.json"],
           resumed_from=1, scope="resume"),
    Damage("scheduler.json last_epoch 999", "unhashed state",
           _edit_json("scheduler.json", _set_key(999, "last_epoch")), (), REJECT, ["scheduler.json", "last_epoch"],
           scope="resume"),
    Damage("scheduler.json garbage", "damaged state", _write("scheduler.json", "{{{"), (), REJECT,
           ["scheduler.json"], scope="resume"),
    Damage("newer empty step-3 folder", "incomplete checkpoint", _newer_step("empty"), (), RUN, [], scope="resume"),
    Damage("newer step-3 with only trainer_state.json", "incomplete checkpoint", _newer_step("state-only"), (), RUN,
           [], scope="resume"),
    Damage("newer step-3 without model.safetensors", "incomplete checkpoint", _newer_step("weights"), (), RUN, [],
           scope="resume"),
    Damage("newer step-3 without rng", "incomplete checkpoint", _newer_step("rng"), (), RUN, [], scope="resume"),
    Damage("newer step-3 without optimizer", "incomplete checkpoint", _newer_step("optimizer"), (), RUN, [],
           scope="resume"),
    Damage("leftover .tmp-step-3", "incomplete checkpoint", _newer_step("tmp"), (), RUN, [], scope="resume"),
    Damage("accelerate pickles planted (optimizer.bin, scheduler.bin, random_states_0.pkl)", "planted pickle",
           _chain(_plant("optimizer.bin"), _plant("scheduler.bin"), _plant("random_states_0.pkl")), (), RUN, [],
           marker=True, scope="resume"),
    Damage("both checkpoints truncated", "damaged weights",
           lambda ctx: [_truncate(W)(DamageContext(ctx.run, ctx.run / "checkpoints" / s, ctx.case, ctx.root))
                        for s in ("step-1", "step-2")] and None, (), REJECT, [W], scope="resume", fallback=False),
]


def checkpoint_cases(root: Path, seed: int = DEFAULT_SEED) -> list[Case]:
    """Each damage through from_pretrained, lilt eval, lilt grow (run/model) and resume (checkpoints/step-2)."""
    del seed  # the damages are fixed; the garbage bytes come from a fixed seed
    cases = []
    for damage in DAMAGES:
        if damage.scope == "model":
            for surface, argv in [
                    ("from_pretrained", []),
                    ("eval", ["eval", "--model", "{case}/run/model", "--data", "builtin:tiny-random",
                              "--out", "{case}/eval-out", "--batch-size", "64"]),
                    ("grow", ["grow", "--model", "{case}/run/model", "--op", "width:heads:2", "--out",
                              "{case}/grown"])]:
                cases.append(Case(f"checkpoint/{surface}/{damage.name}", damage.group, damage.model, damage.names,
                                  surface, argv, damage=damage.name, target="model", marker=damage.marker))
        if damage.resume is not None:
            argv = ["train", "--recipe", str(root / "base" / "recipe.yaml"), "--output-dir", "{case}/run",
                    "train.steps=3", "train.resume=auto"]
            ok, resumed_from = damage.resume, damage.resumed_from
            if ok == REJECT and damage.fallback:
                # Issue 11: a damaged or edited newest checkpoint is skipped (with a warning) in favour of the
                # newest complete one, so resuming from step-1 is right too.
                ok, resumed_from = EITHER, 1
            cases.append(Case(f"checkpoint/resume/{damage.name}", damage.group, ok, damage.names, "resume",
                              argv, damage=damage.name, target="step", marker=damage.marker,
                              resumed_from=resumed_from if "run" in ok else None))
    return cases


def materialize(case: Case, folder: Path, root: Path) -> None:
    """Write a case's files, or a damaged copy of the base run, into its folder."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, data in case.files.items():
        text = base64.b64decode(data)
        (folder / name).write_bytes(text.replace(b"{case}", str(folder).encode()))
    if case.damage:
        run = folder / "run"
        shutil.copytree(root / "base" / "run", run, symlinks=True)
        target = run / "model" if case.target == "model" else run / "checkpoints" / "step-2"
        damage = next(d for d in DAMAGES if d.name == case.damage)
        damage.apply(DamageContext(run, target, folder, root))
        if case.target == "step" and case.resumed_from == 2 and not _matches_manifest(target):
            # Issue 11: a checkpoint whose files no longer match its manifest is skipped, with a warning, in
            # favour of the newest complete one (step-1); continuing from the damaged step-2 would be wrong.
            case.resumed_from = 1


def _matches_manifest(folder: Path) -> bool:
    """Whether every file a resumable checkpoint's manifest lists is there with the sha256 it records."""
    import hashlib

    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
        return all((folder / name).is_file() and hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                   for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------
# the worker: runs cases in-process, one after another
# ---------------------------------------------------------------------------------------------------------

class _StderrProxy(io.TextIOBase):
    """A stream that writes wherever sys.stderr points now (logging handlers bind their stream once)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def prepare_backbones(root: str) -> str:
    """The tiny towers of tests/tiny.py under root/backbones (and a wider BERT for mismatch cases)."""
    from tiny import save_tiny_bert, save_tiny_vit

    folder = Path(root) / "backbones"
    if not (folder / "bert48" / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        save_tiny_vit(folder / "vit")
        save_tiny_bert(folder / "bert")
        save_tiny_bert(folder / "bert48", hidden_size=48)
    return str(folder)


def prepare_run(root: str) -> str:
    """The base run of the checkpoint fuzzer: 2 steps with EMA, checkpoints step-1 and step-2, and model/."""
    import lilt.cli

    root_path = Path(root)
    recipe = base_recipe(root_path)
    recipe["train"].update(save_every=1, ema_decay=0.9, output_dir=str(root_path / "base" / "run"))
    (root_path / "base").mkdir(parents=True, exist_ok=True)
    (root_path / "base" / "recipe.yaml").write_text(_yaml(recipe))
    run = root_path / "base" / "run"
    if not (run / "model" / "lilt_config.json").is_file():
        if run.exists():
            shutil.rmtree(run)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = lilt.cli.main(["train", "--recipe", str(root_path / "base" / "recipe.yaml")])
        if rc != 0:
            raise RuntimeError(f"the base run failed: {out.getvalue()[-2000:]}")
    return str(run)


def _clean_types() -> tuple[type, ...]:
    import lilt
    from lilt.config import ConfigError, DataError
    from lilt.model import BackboneMismatchError

    root = getattr(lilt, "LiltError", None)  # the common root of lilt's errors, once it exists
    return (root,) if isinstance(root, type) else (ConfigError, DataError, BackboneMismatchError, FileNotFoundError)


def _describe(err: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(err.__traceback__)
    lilt_dir = str(REPO / "lilt")
    inner = [f for f in frames if f.filename.startswith(lilt_dir)]
    where = ""
    if inner:
        frame = inner[-1]
        where = f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno} {frame.name}"
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"type": type(err).__name__, "message": str(err), "where": where, "traceback": text[-4000:]}


def _reset_state() -> None:
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        GradientState._reset_state()
    except Exception:  # noqa: BLE001 - best effort between cases
        pass


def _run_one(msg: dict[str, Any]) -> dict[str, Any]:
    import logging

    import lilt.cli

    os.chdir(msg["cwd"])
    env = dict(os.environ)
    _reset_state()
    resumed: list[int] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("resumed from") and isinstance(record.args, tuple):
                resumed.append(int(record.args[-1]))

    capture = _Capture(logging.INFO)
    training_logger = logging.getLogger("lilt.training")
    training_logger.addHandler(capture)
    training_logger.setLevel(logging.INFO)
    out, err = io.StringIO(), io.StringIO()
    result: dict[str, Any] = {"id": msg["id"], "rc": None, "exc": None, "returned": False}
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if msg["op"] == "cli":
                    result["rc"] = lilt.cli.main(msg["argv"])
                elif msg["op"] == "from_pretrained":
                    import lilt
                    try:
                        lilt.DualEncoder.from_pretrained(msg["path"])
                        result["returned"] = True
                    except Exception as error:  # noqa: BLE001 - classified below
                        result["exc"] = _describe(error)
                        result["api_clean"] = isinstance(error, _clean_types())
                elif msg["op"] == "call":
                    result["value"] = globals()[msg["fn"]](*msg.get("args", []))
                    result["rc"] = 0
            except SystemExit as error:
                code = error.code
                result["rc"] = code if isinstance(code, int) else (0 if code is None else 1)
                result["system_exit"] = True
            except BaseException as error:  # noqa: BLE001 - every escape is a finding
                result["exc"] = _describe(error)
    finally:
        training_logger.removeHandler(capture)
        os.environ.clear()
        os.environ.update(env)
    result.update(seconds=time.perf_counter() - start, stderr=err.getvalue()[-6000:], stdout=out.getvalue()[-2000:],
                  resumed_from=resumed[-1] if resumed else None)
    return result


def worker_main(fd: int) -> None:
    """Read case messages (JSON lines) on stdin; write one JSON result line per case to file descriptor fd."""
    import logging
    import warnings

    sys.path[:0] = [str(REPO), str(TESTS)]
    warnings.simplefilter("ignore")
    handler = logging.StreamHandler(_StderrProxy())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    import torch  # noqa: F401 - paid once, before the first case

    import lilt.cli  # noqa: F401
    results = os.fdopen(fd, "w", buffering=1)
    results.write(json.dumps({"ready": True, "lilt": __import__("lilt").__file__}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            result = _run_one(msg)
        except BaseException as error:  # noqa: BLE001 - the harness itself must keep going
            result = {"id": msg.get("id"), "rc": None, "exc": _describe(error), "harness_error": True}
        results.write(json.dumps(result, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------
# the parent: starts the worker, enforces timeouts and a memory limit, classifies
# ---------------------------------------------------------------------------------------------------------

class Worker:
    """A worker process and its result pipe; restarted after a hang."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.restarts = -1

    def start(self) -> None:
        read, write = os.pipe()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
               "HF_MODULES_CACHE": str(self.root / "hf-modules"), "MPLBACKEND": "Agg",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
        log = open(self.root / "worker.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(write)],
                                     stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(write,), env=env,
                                     cwd=self.root, start_new_session=True)
        log.close()
        os.close(write)
        self.results = os.fdopen(read, "r")
        self.buffer = ""
        self.restarts += 1
        ready = self.read(240.0)
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"the fuzz worker did not start; see {self.root / 'worker.log'}")
        self.lilt = ready["lilt"]

    def read(self, timeout: float) -> dict[str, Any] | str | None:
        """The next result line; None on timeout, 'dead' when the worker exited, 'memory' past the limit."""
        deadline = time.monotonic() + timeout
        while "\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.results], [], [], min(left, 0.25))
            if ready:
                chunk = os.read(self.results.fileno(), 1 << 16).decode()
                if not chunk:
                    return "dead"
                self.buffer += chunk
            elif self.proc.poll() is not None:
                return "dead"
            elif _group_rss(self.proc.pid) > MEMORY_LIMIT:
                return "memory"
        line, self.buffer = self.buffer.split("\n", 1)
        return json.loads(line)

    def run(self, msg: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        answer = self.read(timeout)
        if isinstance(answer, dict):
            return answer
        self.kill()
        return answer or "timeout"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            with contextlib.suppress(Exception):
                self.results.close()
        self.proc = None


def _group_rss(pgid: int) -> int:
    """Resident memory of every process in a process group (Linux /proc; 0 elsewhere)."""
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                if os.getpgid(int(entry.name)) != pgid:
                    continue
                with open(f"/proc/{entry.name}/statm") as handle:
                    total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def _mentions(text: str, names: list[str]) -> bool:
    if not names:
        return True
    low = text.lower()
    for name in names:
        token = name.lower()
        if re.search(r"(?<![a-z0-9_])" + re.escape(token) + r"(?![a-z0-9_])", low) or (
                len(token) > 3 and token in low):
            return True
    return False


TQDM_FRAME = re.compile(r"[^\r\n]*?\d+%\|[^|\r\n]*\|[^\[\r\n]*\[[^\]\r\n]*\]")


def classify(case: Case, raw: dict[str, Any] | str, marker_hit: bool) -> Result:
    """Sort a case's raw worker answer into an outcome, with the first error line and a cause to group by."""
    seconds = raw.get("seconds", 0.0) if isinstance(raw, dict) else 0.0

    def result(outcome: str, line: str, cause: str, detail: str = "", note: str = "") -> Result:
        return Result(case.id, case.surface, case.group, case.invalid, outcome, line.strip()[:300], cause,
                      round(seconds, 2), detail[-3000:], note)

    if isinstance(raw, str):
        what = {"timeout": "no result within the timeout", "memory": "killed past the memory limit",
                "dead": "the worker process died"}[raw]
        if raw == "dead":
            return result(TRACEBACK, what, f"worker died ({case.group})")
        return result(HANG, what, f"{case.group}: {what}")
    if marker_hit:
        return result(SILENT, "EXECUTED PLANTED CODE: the marker file was written", "executed untrusted code")
    if raw.get("harness_error"):
        return result(TRACEBACK, "harness error: " + raw["exc"]["message"], "harness error", raw["exc"]["traceback"])
    stderr = raw.get("stderr", "")
    # A progress bar (tqdm, when training was under way) is not part of the error; its last frame has no
    # newline, so an error printed after it shares its line.
    lines = [line for line in TQDM_FRAME.sub("\n", stderr).replace("\r", "\n").splitlines() if line.strip()]
    if case.surface == "from_pretrained":
        exc = raw.get("exc")
        if raw.get("returned"):
            if case.invalid:
                return result(SILENT, "from_pretrained returned a model", f"from_pretrained accepts: {case.group}")
            return result(VALID, "", "")
        first = exc["message"].strip().splitlines()[0] if exc["message"].strip() else ""
        line = f"{exc['type']}: {first}"
        if not raw.get("api_clean"):
            return result(TRACEBACK, line, f"{exc['type']} at {exc['where'] or '?'}", exc["traceback"])
        if "reject" not in case.ok:
            return result(REJECTED, line, f"rejects a valid checkpoint: {case.group}")
        if "\n" in exc["message"].strip():
            return result(UNCLEAR, line, "error message spans several lines", exc["message"])
        if not _mentions(exc["message"], case.names):
            return result(UNCLEAR, line, "error does not name the key/file", note=f"expected one of {case.names}")
        return result(CLEAN, line, "")
    exc = raw.get("exc")
    if exc is not None:
        first = exc["message"].strip().splitlines()[0] if exc["message"].strip() else ""
        return result(TRACEBACK, f"{exc['type']}: {first}", f"{exc['type']} at {exc['where'] or '?'}",
                      exc["traceback"])
    rc = raw.get("rc")
    prefix = f"lilt {case.command}: error:"
    if rc == 0:
        if "run" not in case.ok:
            return result(SILENT, f"exit 0 ({case.group})", f"accepted: {case.group}")
        if case.resumed_from is not None and raw.get("resumed_from") != case.resumed_from:
            got = raw.get("resumed_from")
            return result(SILENT, f"resumed from step {got}, expected step {case.resumed_from}",
                          "resumed from the wrong checkpoint" if got is not None else "did not resume")
        return result(VALID, "", "")
    error_lines = [line for line in lines if line.startswith(prefix)]
    if rc == 2 and error_lines:
        line = error_lines[0]
        if "reject" not in case.ok:
            return result(REJECTED, line, f"rejects a valid input: {case.group}")
        if len(lines) != 1:
            return result(UNCLEAR, line, "error is not one stderr line", stderr)
        if not _mentions(line[len(prefix):], case.names):
            return result(UNCLEAR, line, "error does not name the key/value", note=f"expected one of {case.names}")
        note = ""
        if case.hint and case.hint not in line:
            note = f"no did-you-mean for {case.hint!r}"
        return result(CLEAN, line, "", note=note)
    line = lines[-1] if lines else f"exit {rc}"
    return result(TRACEBACK, f"exit {rc}: {line}", f"exit code {rc}", stderr)


def run_cases(cases: list[Case], root: Path, timeout: float = DEFAULT_TIMEOUT, prepare: tuple[str, ...] = (),
              progress: Callable[[str], None] | None = None, keep: bool = False) -> tuple[list[Result], float]:
    """Run cases through one worker (restarted after hangs); returns the results and the wall time."""
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    worker = Worker(root)
    results: list[Result] = []
    try:
        for fn in prepare:
            answer = worker.run({"id": fn, "op": "call", "fn": fn, "args": [str(root)], "cwd": str(root)}, 600)
            if not isinstance(answer, dict) or answer.get("exc"):
                raise RuntimeError(f"{fn} failed: {answer if isinstance(answer, str) else answer['exc']}")
        for index, case in enumerate(cases):
            folder = root / "cases" / f"{index:04d}"
            try:
                materialize(case, folder, root)
            except Exception as error:  # noqa: BLE001 - a broken case must not stop the run
                results.append(Result(case.id, case.surface, case.group, case.invalid, TRACEBACK,
                                      f"harness error while setting up: {type(error).__name__}: {error}",
                                      "harness error", 0.0, traceback.format_exc()[-3000:]))
                continue
            argv = [a.replace("{case}", str(folder)) for a in case.argv]
            if case.surface == "from_pretrained":
                msg = {"id": case.id, "op": "from_pretrained", "path": str(folder / "run" / "model")}
            else:
                msg = {"id": case.id, "op": "cli", "argv": argv}
            msg["cwd"] = str(folder)
            raw = worker.run(msg, timeout)
            marker = (folder / "MARKER").exists()
            res = classify(case, raw, marker)
            results.append(res)
            if progress:
                progress(f"[{index + 1}/{len(cases)}] {res.outcome:<17} {res.seconds:6.2f}s {case.id}"
                         + (f"  -> {res.line[:120]}" if res.outcome in BAD else ""))
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        worker.kill()
    return results, time.perf_counter() - began


# ---------------------------------------------------------------------------------------------------------
# tables and reports
# ---------------------------------------------------------------------------------------------------------

COLUMNS = [("cases", None), ("clean errors", CLEAN), ("unclear errors", UNCLEAR), ("tracebacks", TRACEBACK),
           ("accepted silently", SILENT), ("hangs", HANG), ("valid", VALID), ("rejected valid", REJECTED)]


def counts(results: list[Result]) -> dict[str, int]:
    out = {"cases": len(results)}
    for label, outcome in COLUMNS[1:]:
        out[label] = sum(r.outcome == outcome for r in results)
    return out


def table(results: list[Result], by_surface: bool = True) -> str:
    """A markdown table: one row per surface (when several) and a total."""
    rows = []
    surfaces = sorted({r.surface for r in results}, key=["train", "from_pretrained", "eval", "grow",
                                                         "resume"].index)
    if by_surface and len(surfaces) > 1:
        rows += [(s, counts([r for r in results if r.surface == s])) for s in surfaces]
    rows.append(("total" if len(rows) else surfaces[0] if surfaces else "total", counts(results)))
    header = "| surface | " + " | ".join(label for label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(str(row[label]) for label, _ in COLUMNS) + " |")
    return "\n".join(lines)


def problems(results: list[Result]) -> str:
    """Every non-clean, non-valid case with its first error line, grouped by outcome and cause."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.outcome in BAD:
            groups.setdefault((r.outcome, r.cause), []).append(r)
    out = []
    order = {o: i for i, o in enumerate((TRACEBACK, HANG, SILENT, REJECTED, UNCLEAR))}
    for (outcome, cause), items in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], -len(kv[1]), kv[0][1])):
        out.append(f"\n#### {outcome}: {cause} ({len(items)})\n")
        for r in items:
            out.append(f"- `{r.id}`: {r.line}" + (f" ({r.note})" if r.note else ""))
    return "\n".join(out)


def notes(results: list[Result]) -> str:
    items = [r for r in results if r.outcome == CLEAN and r.note]
    return "\n".join(f"- `{r.id}`: {r.note}: {r.line}" for r in items)


def run_fuzzer(kind: str, root: Path | None = None, seed: int = DEFAULT_SEED, timeout: float = DEFAULT_TIMEOUT,
               limit: int | None = None, progress: Callable[[str], None] | None = None,
               keep: bool = False, only: str | None = None) -> tuple[list[Case], list[Result], float]:
    """Generate and run the recipe or checkpoint fuzzer in `root` (a temporary folder by default)."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix=f"lilt-fuzz-{kind}-")) if own else Path(root)
    try:
        cases = recipe_cases(root, seed) if kind == "recipes" else checkpoint_cases(root, seed)
        if only:
            cases = [c for c in cases if only in c.id]
        if limit:
            cases = sorted(random.Random(seed).sample(cases, min(limit, len(cases))), key=cases.index)
        prepare = ("prepare_backbones",) + (("prepare_run",) if kind == "checkpoints" else ())
        results, seconds = run_cases(cases, root, timeout, prepare, progress, keep)
        return cases, results, seconds
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["recipes", "checkpoints"])
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--markdown", help="write the table and the list of problems here")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case")
    parser.add_argument("--limit", type=int, help="run a seeded sample of this many cases")
    parser.add_argument("--only", help="run only the cases whose id contains this text")
    parser.add_argument("--root", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the case folders")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    cases, results, seconds = run_fuzzer(args.kind, Path(args.root) if args.root else None, args.seed, args.timeout,
                                         args.limit, None if args.quiet else (lambda s: print(s, flush=True)),
                                         args.keep, args.only)
    text = (f"{args.kind}: {len(cases)} cases in {seconds:.0f} s (seed {args.seed}, timeout {args.timeout:g} s)\n\n"
            + table(results))
    if args.kind == "checkpoints":
        text += f"\n\n{len({c.damage for c in cases})} damaged checkpoints (incl. the pristine control)"
    print("\n" + text)
    print(problems(results))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "kind": args.kind, "seed": args.seed, "timeout": args.timeout, "seconds": round(seconds, 1),
            "counts": counts(results), "results": [dataclasses.asdict(r) for r in results],
            "cases": [dataclasses.asdict(c) | {"files": sorted(c.files)} for c in cases]}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n" + problems(results) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(int(sys.argv[2]))
    else:
        sys.exit(main())
