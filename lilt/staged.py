"""Staged training with growth (GrowCLIP): the data each stage reveals, growth when a stage starts, the search.

A run with `TrainConfig.growth` trains stage by stage. Each stage sees a cumulative fraction of the
training set (one seeded order) or adds a pair source, and may first grow the model in place: fixed ops,
or candidates each trained a few steps on a clone and compared by validation recall (the winner is kept
with its steps). After growth a new AdamW takes over the old one's state (lilt.growth.optim) and the
learning-rate schedule continues where it was.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from accelerate.utils import broadcast_object_list

from .config import DataConfig, TrainConfig
from .data import load_pairs
from .data.resolve import source_options
from .errors import ConfigError, DataError
from .growth.grower import clone_model, grow_
from .growth.ops import Inheritance
from .growth.optim import migrate_optimizer_state
from .optim import make_optimizer, scheduler_at

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """A stretch of training on one table: stage `index`, steps [begin, end)."""

    index: int
    begin: int
    end: int
    data: Any
    stage: Any = None  # GrowthStage, or None without growth


def stage_segments(data: Any, config: TrainConfig, data_config: DataConfig) -> list[Segment]:
    """The tables each growth stage trains on (one segment over all the data without growth)."""
    if not config.growth:
        return [Segment(0, 0, config.steps, data)]
    if isinstance(data, datasets.IterableDataset):
        raise ConfigError("growth stages reveal fractions of the training set; load it as a map-style dataset "
                          "(DataConfig.streaming: false).")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)).tolist()
    fraction, added, segments, begin = 0.0, [], [], 0
    options = source_options(data_config, config.seed)
    for index, stage in enumerate(config.growth):
        if isinstance(stage.data, str):
            extra = load_pairs(stage.data, data_config.split, **options)
            added.append(extra.select_columns([c for c in data.column_names if c in extra.column_names]))
        else:
            fraction = stage.data
        parts = ([data.select(sorted(order[:max(1, math.ceil(fraction * len(data)))]))] if fraction else []) + added
        try:
            table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        except ValueError as err:
            raise DataError(f"growth stage {index + 1}: its source {stage.data!r} does not fit the training "
                            f"pairs' columns ({err}).") from err
        segments.append(Segment(index, begin, begin + stage.steps, table, stage))
        begin += stage.steps
    return segments


def needs_growth(loop: Any, seg: Segment, start: int) -> bool:
    """Whether a stage grows the model now: it has ops, training is at its first step, and it has not grown yet."""
    stage = seg.stage
    return stage is not None and bool(stage.grow or stage.candidates) and start == seg.begin and \
        not any(r.get("stage") == seg.index + 1 for r in loop.model.growth[loop.grown_before:])


def grow_stage(loop: Any, seg: Segment, val: Any, history: list[dict[str, Any]]) -> int:
    """Grow the model in place for a stage (fixed ops or a search); returns the step training continues at."""
    stage = seg.stage
    if stage.inherit_from == "ema" and loop.ema is not None:
        params = dict(loop.model.named_parameters())
        with torch.no_grad():
            for name, value in loop.ema.items():
                params[name].copy_(value)
    inherit = Inheritance(momentum=stage.inherit_momentum, width_init=stage.width_init)
    winner = None
    if stage.candidates:
        winner, scores = search(loop, seg, val, inherit)
        ops = [op.strip() for op in stage.candidates[winner["index"]].split("+")]
    else:
        ops, scores = list(stage.grow), None
    old_names = {p: n for n, p in loop.model.named_parameters()}
    old_optimizer = getattr(loop.optimizer, "optimizer", loop.optimizer)
    widened = grow_ops(loop, loop.model, ops, inherit, seg)
    if scores is not None:
        loop.model.growth[-1]["search"] = scores
    optimizer = make_optimizer(loop.model, loop.config)
    step = seg.begin
    if winner is not None:  # continue from the candidate that won, its search steps included
        loop.model.load_state_dict(winner["model"].delta_state_dict(), strict=False)
        names = {p: n for n, p in winner["model"].named_parameters()}
        migrate_optimizer_state(winner["optimizer"], names, optimizer, loop.model)
        step += stage.search_steps
        del winner
    elif stage.optimizer_state != "reset":
        migrate_optimizer_state(old_optimizer, old_names, optimizer, loop.model, widened, stage.optimizer_state)
    loop.install(loop.model, optimizer, scheduler_at(optimizer, loop.config, step))
    if loop.acc.is_main_process:
        logger.info("stage %d: grew %s; %d trainable parameters", seg.index + 1, ops,
                    sum(p.numel() for p in loop.model.parameters() if p.requires_grad))
    history.append({"step": step, "grew": ops, "stage": seg.index + 1, **({"search": scores} if scores else {})})
    return step


def grow_ops(loop: Any, model: torch.nn.Module, ops: list[str], inherit: Inheritance, seg: Segment) -> dict[str, Any]:
    """Apply growth ops in place with fresh values from the stage's own seed; returns what was widened."""
    widened: dict[str, Any] = {}
    # Fresh values come from a seed of their own: the same on every process and for every candidate,
    # and the training RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(loop.config.seed * 1000 + seg.index)
        for op in ops:
            result = grow_(model, op, inherit)
            widened.update(result.widened)
            model.growth[-1]["stage"] = seg.index + 1
    return widened


def search(loop: Any, seg: Segment, val: Any, inherit: Inheritance) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """GrowCLIP's search, kept cheap: train each candidate search_steps on the stage's data, keep the best."""
    stage, base = seg.stage, loop.model
    base_names = {p: n for n, p in base.named_parameters()}
    base_optimizer = getattr(loop.optimizer, "optimizer", loop.optimizer)
    rng = torch.random.get_rng_state()
    kept_ema, loop.ema = loop.ema, None  # candidates do not touch the run's moving average
    kept_bad = loop.bad.state_dict()
    scores: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for index, candidate in enumerate(stage.candidates):
        torch.random.set_rng_state(rng)  # every candidate sees the same batches and draws
        model = clone_model(base)
        widened = grow_ops(loop, model, [op.strip() for op in candidate.split("+")], inherit, seg)
        optimizer = make_optimizer(model, loop.config)
        if stage.optimizer_state != "reset":
            migrate_optimizer_state(base_optimizer, base_names, optimizer, model, widened, stage.optimizer_state)
        loop.install(model, optimizer, scheduler_at(optimizer, loop.config, seg.begin), ema=False)
        model.train()
        for i, batch in enumerate(loop.loader(seg.data)):
            if i >= stage.search_steps:
                break
            if loop.bad.count(batch):
                loop.step(batch, seg.begin + i + 1)
        metrics = loop.evaluate(val, seg.begin + stage.search_steps)
        score = [mean_r1(metrics)]
        if loop.acc.num_processes > 1:  # only the main process evaluated
            broadcast_object_list(score)
        scores.append({"candidate": candidate, "val_mean_R@1": score[0],
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        if best is None or score[0] > best["score"]:
            best = {"index": index, "score": score[0], "model": model,
                    "optimizer": getattr(loop.optimizer, "optimizer", loop.optimizer)}
        if loop.acc.is_main_process:
            logger.info("stage %d candidate %s: validation mean R@1 %.2f", seg.index + 1, candidate, score[0])
    loop.bad.load_state_dict(kept_bad)
    loop.ema, loop.model = kept_ema, base  # the caller grows the base model like the winner
    return best, scores


def mean_r1(metrics: dict[str, Any]) -> float:
    """Mean of the i2t and t2i R@1 over the validation languages (how candidates are compared)."""
    values = [v for k, v in metrics.items() if k.endswith("/R@1")]
    return sum(values) / len(values) if values else 0.0
