"""The Accelerate training loop (`lilt.train`): contrastive loss, global negatives, exact accumulation and resume.

`train(model, data, TrainConfig(...))` runs the same from a notebook, `python -m lilt.cli train` or
`accelerate launch -m lilt.cli train`. The batch size is global: each step scores `batch_size` pairs
against each other whatever the number of processes (accelerate splits each batch across them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import state as ckpt
from .config import ConfigError, DataConfig, TrainConfig
from .data import DataError, PairCollator, image_transform, load_pairs, pair_loader
from .eval.retrieval import EmbeddedPairs, embed_pairs, evaluate_retrieval
from .growth import migrate_optimizer_state
from .losses import clip_loss, siglip_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: steps, final validation metrics, the logged history and the data it skipped."""

    output_dir: Path
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_items: int = 0
    nonfinite_steps: int = 0
    samples_per_second: float = 0.0
    resumed_from: int | None = None
    model: Any = None
    stages: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on trainable matrices only (not biases, norms, gains or the logit scale/bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "logit_" not in name else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameter; apply a TuningPlan first (lilt.apply_plan).")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine / linear decay to zero, or constant; growth stages may restart it."""
    restarts, begin = [0], 0
    for stage in config.growth:
        if stage.restart_schedule and begin:
            restarts.append(begin)
        begin += stage.steps

    def factor(step: int) -> float:
        start = max(b for b in restarts if b <= step)  # each restart's schedule ends where the next begins
        local, total = step - start, min([b for b in restarts if b > step] + [config.steps]) - start
        if local < config.warmup_steps:
            return (local + 1) / (config.warmup_steps + 1)
        progress = min(1.0, (local - config.warmup_steps) / max(1, total - config.warmup_steps))
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if config.schedule == "linear" else 1.0
    return factor


def continued_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                        step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's LambdaLR over `optimizer`, positioned at `step` (so a rebuilt optimizer continues the schedule)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if step:
        factor = scheduler.lr_lambdas[0](step)
        scheduler.last_epoch = step
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def contrastive_loss(config: TrainConfig) -> Callable[..., torch.Tensor]:
    """The configured loss as f(image_embeds, text_embeds, logit_scale, logit_bias)."""
    if config.loss == "siglip":
        def siglip(img, txt, scale, bias):
            if bias is None:
                raise ConfigError("loss 'siglip' needs a logit bias: build the model with logit_bias=-10.")
            return siglip_loss(img.float(), txt.float(), scale, bias)
        return siglip
    # Embeddings may come out of autocast in half precision; the softmax over the batch wants fp32.
    return lambda img, txt, scale, bias: clip_loss(img.float(), txt.float(), scale, local_loss=config.local_loss)


def _source_options(data_config: DataConfig, seed: int) -> dict[str, Any]:
    """load_pairs keyword arguments a DataConfig implies (columns, languages, seed, source options)."""
    return dict(image_column=data_config.image_column, text_column=data_config.text_column,
                lang_column=data_config.lang_column, langs=data_config.langs, seed=seed, **data_config.options)


def resolve_data(data: Any, data_config: DataConfig | None, seed: int) -> tuple[Any, Any, DataConfig]:
    """Training and validation tables from a spec string, a DataConfig or a ready `datasets` table."""
    if isinstance(data, DataConfig):
        data_config, data = data, None
    elif isinstance(data, (str, os.PathLike)):
        data_config = DataConfig.from_dict({**(data_config.to_dict() if data_config else {}), "source": str(data)})
        data = None
    data_config = data_config or DataConfig()
    options = _source_options(data_config, seed)
    if data is None:
        data = load_pairs(data_config.source, data_config.split, pairs_per_lang=data_config.pairs_per_lang,
                          max_pairs=data_config.max_pairs, streaming=data_config.streaming, **options)
    val = None
    if data_config.val_source or data_config.source.startswith("builtin:"):
        val = load_pairs(data_config.val_source or data_config.source, data_config.val_split, **options)
    return data, val, data_config


def _accelerator(config: TrainConfig, model: torch.nn.Module) -> Accelerator:
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    precision = None if config.mixed_precision == "auto" else config.mixed_precision
    # A contrastive loss that leaves the logit bias unused would make DDP wait for its gradient forever.
    unused = getattr(model, "logit_bias", None) is not None and config.loss != "siglip"
    return Accelerator(
        mixed_precision=precision, log_with=config.report_to or None, project_dir=config.output_dir,
        # `accelerate launch --multi_gpu` on a machine without GPUs: run the processes on CPU with gloo.
        cpu=multi and not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def train(model: torch.nn.Module, data: Any = None, config: TrainConfig | None = None, *,
          data_config: DataConfig | None = None, val_data: Any = None,
          on_stage_end: Callable[[torch.nn.Module, int, int], dict[str, Any]] | None = None) -> TrainResult:
    """Train the model's trainable parameters contrastively on image-text pairs; returns what happened.

    With `TrainConfig.growth` the run goes in stages: each trains on the data revealed so far and may
    first grow the model in place (lilt.growth); `on_stage_end(model, stage, step)` may return extra
    metrics recorded with each stage.
    """
    config = config or TrainConfig()
    accelerator = _accelerator(config, model)
    set_seed(config.seed)  # dropout and any other draws of the loop; a resume restores its saved states instead
    data, val, data_config = resolve_data(data, data_config, config.seed)
    val = val_data if val_data is not None else val
    if config.batch_size % (accelerator.num_processes * config.accumulation_steps):
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} must divide evenly over "
                          f"{accelerator.num_processes} processes x {config.accumulation_steps} micro-batches.")
    segments = stage_segments(data, config, data_config)
    for seg in segments:
        if not isinstance(seg.data, datasets.IterableDataset) and len(seg.data) < config.batch_size:
            where = f" in growth stage {seg.index + 1}" if config.growth else ""
            raise DataError(f"only {len(seg.data)} training pairs{where} for batch_size={config.batch_size}; lower "
                            "the batch size" + (" or reveal more data in that stage." if config.growth else "."))
    if any(seg.stage is not None and seg.stage.candidates for seg in segments) and val is None:
        raise ConfigError("a growth stage with candidates compares them by validation recall; give validation "
                          "pairs (DataConfig.val_source, or a builtin source with a validation split).")
    output = Path(config.output_dir)
    # A model loaded from a grown checkpoint carries growth records that are not this run's.
    grown_before = len(getattr(model, "growth", []))
    folder = _resume_folder(config, output)
    if folder is not None:  # rebuild what the checkpoint's run had grown, so its tensors and optimizer fit
        from .growth import replay_growth
        from .model import read_manifest
        history = read_manifest(folder).get("growth", [])
        replay_growth(model, history[len(model.growth):])
    collate = PairCollator(image_transform(model.vision.data_config, data_config.augment, train=True),
                           model.tokenize, seed=config.seed)
    if config.head_warmup_epochs and folder is None:
        warm_up_heads(model, segments[0].data, config, data_config.num_workers, accelerator.is_main_process)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    loop = _Loop(accelerator, model, config, data_config, contrastive_loss(config), collate)
    loop.grown_before = grown_before
    loop.install(model, optimizer, scheduler)
    result = TrainResult(output, 0, model=model)
    start = loop.resume(folder, result)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(config.to_json())
        (output / "data_config.json").write_text(data_config.to_json())
    accelerator.init_trackers("lilt", config={k: str(v) for k, v in config.to_dict().items()})
    loop.run(segments, start, val, result, on_stage_end)
    accelerator.end_training()
    return result


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
    options = _source_options(data_config, config.seed)
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


def _resume_folder(config: TrainConfig, output: Path) -> Path | None:
    """The checkpoint TrainConfig.resume points at, or None to start afresh."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        found = ckpt.checkpoint_dirs(output)
        return found[-1] if found else None
    folder = Path(config.resume)
    if not (folder / ckpt.STATE_NAME).is_file():
        raise ConfigError(f"TrainConfig.resume={config.resume!r} is not a complete checkpoint "
                          f"(no {ckpt.STATE_NAME}); use 'auto', 'never' or a checkpoints/step-N folder.")
    return folder


def warm_up_heads(model: torch.nn.Module, data: datasets.Dataset, config: TrainConfig, num_workers: int = 0,
                  progress: bool = True, features: EmbeddedPairs | None = None) -> list[float]:
    """Fit the projection heads and temperature by InfoNCE on frozen features of the training pairs (LP-FT).

    Kumar et al. (ICLR 2022) show that fine-tuning from a fitted linear head distorts pretrained features
    less than fine-tuning from a random one. The features are computed once, in eval mode, with the plan's
    added modules still at their identity initialization. Every process computes the same thing, so
    the heads agree without communication. Returns the mean loss of each epoch.
    """
    if isinstance(data, datasets.IterableDataset):
        raise ConfigError("head_warmup_epochs needs a map-style dataset (the features are computed once).")
    if features is None:  # `features`: the same, already computed (the demo shares them with its baselines)
        features = embed_pairs(model, data, features=True, batch_size=config.eval_batch_size,
                               num_workers=num_workers)
    images, texts = features.images[features.text_image].to(model.device), features.texts.to(model.device)
    heads = [p for p in (*model.vision_proj.parameters(), *model.text_proj.parameters(), model.logit_scale)
             if p.requires_grad]  # a text-tower swap keeps the vision head frozen
    optimizer = torch.optim.AdamW(heads, lr=config.head_warmup_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(config.head_warmup_batch_size or config.batch_size, len(texts))
    losses = []
    for _ in tqdm(range(config.head_warmup_epochs), desc="head warm-up", disable=not progress, leave=False):
        order, total = torch.randperm(len(texts), generator=generator), 0.0
        for start in range(0, len(texts) - batch + 1, batch):
            rows = order[start:start + batch]
            image = F.normalize(model.vision_proj(images[rows]), dim=-1)
            text = F.normalize(model.text_proj(texts[rows]), dim=-1)
            loss = clip_loss(image, text, model.scale(), gather=False)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / max(1, len(texts) // batch))
    return losses


class _Loop:
    """The step machinery shared by the training loop: forward/backward, logging, checkpoints, bad data, growth."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig,
                 data_config: DataConfig, loss_fn: Callable, collate: PairCollator) -> None:
        self.acc, self.model, self.config, self.data_config = accelerator, model, config, data_config
        self.prepared: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.loss_fn, self.collate = loss_fn, collate
        self.counts = {"seen": 0, "bad": 0, "nonfinite_in_a_row": 0, "nonfinite": 0, "epoch": 0}
        self.bad_names: list[str] = []
        self.ema: dict[str, torch.Tensor] | None = None
        self.grown_before = 0

    def install(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                ema: bool = True) -> None:
        """Prepare a (new or grown) model with its optimizer and scheduler, dropping the previous ones."""
        if self.prepared is not None:
            if hasattr(self.prepared, "_remove_autograd_hooks"):
                # DDP's reducer hooks the parameters it was built on; a stale one would all-reduce them again.
                self.prepared._remove_autograd_hooks()
            self.acc.free_memory()
            self.prepared = None
        self.prepared, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        self.model = model
        if self.config.ema_decay is not None and ema:  # after prepare: DDP has made every process's weights equal
            old = self.ema or {}
            self.ema = {n: old[n] if n in old and old[n].shape == p.shape else p.detach().clone()
                        for n, p in model.named_parameters() if p.requires_grad}

    def loader(self, data: Any) -> Any:
        """A prepared loader over one stage's table."""
        loader = pair_loader(data, self.collate, self.config.batch_size, seed=self.config.seed,
                             num_workers=self.data_config.num_workers, pin_memory=self.data_config.pin_memory)
        return self.acc.prepare(loader)

    # -- one step ------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on a batch (micro-batched when configured); returns the loss (nan: skipped)."""
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")
                  if k in batch}
        chunks = self.config.accumulation_steps
        if chunks > 1 and self.config.accumulation == "gradcache":
            loss = grad_cache_backward(self.prepared, self.model, inputs, chunks, self.loss_fn, self.acc)
        else:
            loss = self._plain_backward(inputs, chunks)
        # One collective for two facts: whether every process has a finite loss, and the global mean loss
        # (with local_loss each process holds only its share).
        stats = torch.tensor([float(math.isfinite(loss)), loss if math.isfinite(loss) else 0.0], device=self.acc.device)
        finite, loss = self.acc.reduce(stats, "sum").tolist()
        loss /= self.acc.num_processes
        if int(finite) < self.acc.num_processes:
            # Every process takes the same decision, so none waits in a collective the others skipped.
            self.optimizer.zero_grad(set_to_none=True)
            self.counts["nonfinite"] += 1
            self.counts["nonfinite_in_a_row"] += 1
            if self.counts["nonfinite_in_a_row"] >= self.config.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.counts['nonfinite_in_a_row']} steps in a row had a non-finite loss; lower the learning "
                    "rate (TrainConfig.lr), enable clipping (max_grad_norm) or use mixed_precision='bf16' not 'fp16'.")
            return float("nan")
        self.counts["nonfinite_in_a_row"] = 0
        if self.config.max_grad_norm is not None:
            self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                     self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            params = dict(self.model.named_parameters())
            names = list(self.ema)
            torch._foreach_lerp_([self.ema[n] for n in names], [params[n].detach() for n in names],
                                 1.0 - self.config.ema_decay)
        return loss

    def _plain_backward(self, inputs: dict[str, torch.Tensor], chunks: int) -> float:
        total = 0.0
        for i, micro in enumerate(_split(inputs, chunks)):
            sync = self.acc.no_sync(self.prepared) if i < chunks - 1 else contextlib.nullcontext()
            with sync:
                out = self.prepared(**micro)
                loss = self.loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias) / chunks
                self.acc.backward(loss)
            total += float(loss.detach())
        return total

    # -- bad data ------------------------------------------------------------------------------------
    def count_data(self, batch: dict[str, Any]) -> bool:
        """Add a batch's seen/bad counts over all processes; False when some process got no usable pair."""
        local = torch.tensor([batch["seen"], len(batch["bad"]), int("pixel_values" not in batch)],
                             device=self.acc.device)
        total = self.acc.reduce(local, "sum")
        self.counts["seen"] += int(total[0])
        self.counts["bad"] += int(total[1])
        if len(self.bad_names) < 20:
            self.bad_names += batch["bad"][:20 - len(self.bad_names)]
        return int(total[2]) == 0

    def end_epoch(self, result: TrainResult) -> None:
        """Report an epoch's unreadable items; stop when they exceed DataConfig.max_bad_fraction."""
        seen, bad = self.counts["seen"], self.counts["bad"]
        result.bad_items += bad
        if bad:
            names = [n for names in _gather_object(self.acc, self.bad_names) for n in names][:5]
            fraction = bad / max(1, seen)
            if fraction > self.data_config.max_bad_fraction:
                raise DataError(
                    f"{bad} of {seen} items ({fraction:.1%}) in epoch {self.counts['epoch']} could not be read, more "
                    f"than DataConfig.max_bad_fraction={self.data_config.max_bad_fraction}. First ones: "
                    f"{'; '.join(names)}. Fix or remove them, or raise max_bad_fraction.")
            if self.acc.is_main_process:
                logger.warning("skipped %d of %d unreadable items in epoch %d (%.2f%%), e.g. %s", bad, seen,
                               self.counts["epoch"], 100 * fraction, "; ".join(names))
        self.counts.update(seen=0, bad=0, epoch=self.counts["epoch"] + 1)
        self.bad_names = []

    # -- checkpoints -----------------------------------------------------------------------------------
    def save(self, output: Path, step: int, steps_per_epoch: int | None) -> None:
        """A resumable checkpoint at output/checkpoints/step-N (trainable tensors, optimizer, RNG, position)."""
        folder = output / "checkpoints"
        tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
        if self.acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self.model.save_pretrained(tmp)
            ckpt.save_optimizer(self.optimizer, tmp)
            ckpt._write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            if self.ema is not None:
                save_file({n: t.contiguous().cpu() for n, t in self.ema.items()}, str(tmp / "ema.safetensors"))
        self.acc.wait_for_everyone()
        ckpt.save_rng(tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "steps_per_epoch": steps_per_epoch, "processes": self.acc.num_processes,
                     "counts": self.counts, "bad_names": self.bad_names}
            ckpt.finalize(tmp, final, state, self.config.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self, folder: Path | None, result: TrainResult) -> int:
        """Load a checkpoint (found by _resume_folder); returns the step to continue from."""
        if folder is None:
            return 0
        meta = ckpt.read_state(folder)
        from .model import read_manifest
        self.model.load_delta(folder / "model.safetensors", read_manifest(folder)["weights"]["sha256"])
        ckpt.load_optimizer(self.optimizer, folder)
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        ckpt.load_rng(folder, self.acc.process_index)
        if self.ema is not None and (folder / "ema.safetensors").is_file():
            self.ema = {n: t.to(self.acc.device) for n, t in load_file(str(folder / "ema.safetensors")).items()}
        self.counts.update(meta["counts"])
        self.bad_names = meta.get("bad_names", [])
        result.resumed_from = meta["step"]
        if self.acc.is_main_process:
            logger.info("resumed from %s (step %d)", folder, meta["step"])
        return meta["step"]

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, segments: list[Segment], start: int, val: Any, result: TrainResult,
            on_stage_end: Callable | None = None) -> None:
        """Train from step `start` to TrainConfig.steps, stage by stage, evaluating, logging and checkpointing."""
        config, acc, output = self.config, self.acc, result.output_dir
        bar = tqdm(total=config.steps, initial=start, disable=not acc.is_main_process, desc="train", unit="step")
        history = [h for h in _read_history(output) if h["step"] <= start] if start else []
        result.stages = [h["stage_end"] for h in history if "stage_end" in h]
        began, samples = time.perf_counter(), [0]
        for seg in segments:
            if start >= seg.end:
                continue
            stage = seg.stage
            if stage is not None and (stage.grow or stage.candidates) and start == seg.begin \
                    and not any(r.get("stage") == seg.index + 1 for r in self.model.growth[self.grown_before:]):
                start = self.grow_stage(seg, val, history)
                bar.update(start - seg.begin)
            self.model.train()
            self.train_segment(seg, start, val, result, history, bar, began, samples)
            start = seg.end
            if config.growth:
                summary = {"stage": seg.index + 1, "step": seg.end, "pairs": len(seg.data),
                           "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                           "growth": [r["op"] for r in self.model.growth[self.grown_before:]
                                      if r.get("stage") == seg.index + 1]}
                if val is not None and seg.end < config.steps:
                    summary.update({k: v for k, v in self.evaluate(val, seg.end).items() if k != "step"})
                if on_stage_end is not None:
                    summary.update(on_stage_end(self.model, seg.index + 1, seg.end) or {})
                result.stages.append(summary)
                history.append({"step": seg.end, "stage_end": summary})
        bar.close()
        step = config.steps
        result.steps, result.samples_per_second = step, samples[0] / max(1e-9, time.perf_counter() - began)
        result.nonfinite_steps = self.counts["nonfinite"]
        result.bad_items += self.counts["bad"]
        result.model = self.model
        if val is not None:
            final = self.evaluate(val, step)
            history.append(final)
            result.metrics = final
            if result.stages:  # the last stage's summary carries the final validation metrics
                result.stages[-1].update({k: v for k, v in final.items() if k != "step"})
        result.history = history
        self._write_history(output, history)
        self.save(output, step, None)
        if acc.is_main_process:
            self.model.save_pretrained(output / "model")

    def train_segment(self, seg: Segment, start: int, val: Any, result: TrainResult, history: list[dict[str, Any]],
                      bar: Any, began: float, samples: list[int]) -> None:
        """Steps [start, seg.end) on the segment's data."""
        config, acc, output = self.config, self.acc, result.output_dir
        loader = self.loader(seg.data)
        steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None
        if steps_per_epoch == 0:
            raise DataError("the training data gives no full batch; lower TrainConfig.batch_size.")
        done = start - seg.begin
        epoch = done // steps_per_epoch if steps_per_epoch else self.counts["epoch"]
        skip = done - epoch * steps_per_epoch if steps_per_epoch else done
        step = start
        while step < seg.end:
            epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
            # Accelerate's loaders re-set the sampler's epoch from their own counter when iterated.
            epoch_loader.set_epoch(epoch)
            skip = 0
            with torch.random.fork_rng(devices=[]):
                # Starting workers draws a seed from the global RNG; keep that out of the training stream.
                batches = iter(epoch_loader)
            for batch in batches:
                usable = self.count_data(batch)
                loss = self.step(batch) if usable else float("nan")
                step += 1
                samples[0] += config.batch_size
                rate = samples[0] / (time.perf_counter() - began)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", sps=f"{rate:.1f}")
                if step % config.log_every == 0 or step == config.steps:
                    entry = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                             "temperature": float(1 / self.model.scale().detach()), "samples_per_second": rate,
                             "seconds": time.perf_counter() - began}
                    acc.log({k: v for k, v in entry.items() if k != "step"}, step=step)
                    history.append(entry)
                if val is not None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    history.append(self.evaluate(val, step))
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    self._write_history(output, history)
                    self.save(output, step, steps_per_epoch)
                if step >= seg.end:
                    break
            else:
                self.end_epoch(result)
                epoch += 1

    # -- growth -------------------------------------------------------------------------------------------
    def grow_stage(self, seg: Segment, val: Any, history: list[dict[str, Any]]) -> int:
        """Grow the model in place for a stage (fixed ops or a search); returns the step training continues at."""
        from .growth import Inheritance

        stage = seg.stage
        if stage.inherit_from == "ema" and self.ema is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.ema.items():
                    params[name].copy_(value)
        inherit = Inheritance(momentum=stage.inherit_momentum, width_init=stage.width_init)
        winner = None
        if stage.candidates:
            winner, scores = self.search(seg, val, inherit)
            ops = [op.strip() for op in stage.candidates[winner["index"]].split("+")]
        else:
            ops, scores = list(stage.grow), None
        old_names = {p: n for n, p in self.model.named_parameters()}
        old_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        widened = self._grow_ops(self.model, ops, inherit, seg)
        if scores is not None:
            self.model.growth[-1]["search"] = scores
        optimizer = make_optimizer(self.model, self.config)
        step = seg.begin
        if winner is not None:  # continue from the candidate that won, its search steps included
            self.model.load_state_dict(winner["model"].delta_state_dict(), strict=False)
            names = {p: n for n, p in winner["model"].named_parameters()}
            migrate_optimizer_state(winner["optimizer"], names, optimizer, self.model)
            step += stage.search_steps
            del winner
        elif stage.optimizer_state != "reset":
            migrate_optimizer_state(old_optimizer, old_names, optimizer, self.model, widened, stage.optimizer_state)
        self.install(self.model, optimizer, continued_scheduler(optimizer, self.config, step))
        if self.acc.is_main_process:
            logger.info("stage %d: grew %s; %d trainable parameters", seg.index + 1, ops,
                        sum(p.numel() for p in self.model.parameters() if p.requires_grad))
        history.append({"step": step, "grew": ops, "stage": seg.index + 1, **({"search": scores} if scores else {})})
        return step

    def _grow_ops(self, model: torch.nn.Module, ops: list[str], inherit: Any, seg: Segment) -> dict[str, Any]:
        from .growth import grow_

        widened: dict[str, Any] = {}
        # Fresh values come from a seed of their own: the same on every process and for every candidate,
        # and the training RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1000 + seg.index)
            for op in ops:
                result = grow_(model, op, inherit)
                widened.update(result.widened)
                model.growth[-1]["stage"] = seg.index + 1
        return widened

    def search(self, seg: Segment, val: Any, inherit: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """GrowCLIP's search, kept cheap: train each candidate search_steps on the stage's data, keep the best."""
        from accelerate.utils import broadcast_object_list

        from .growth import clone_model

        stage, base = seg.stage, self.model
        base_names = {p: n for n, p in base.named_parameters()}
        base_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        rng = torch.random.get_rng_state()
        kept_ema, self.ema = self.ema, None  # candidates do not touch the run's moving average
        scores: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        for index, candidate in enumerate(stage.candidates):
            torch.random.set_rng_state(rng)  # every candidate sees the same batches and draws
            model = clone_model(base)
            widened = self._grow_ops(model, [op.strip() for op in candidate.split("+")], inherit, seg)
            optimizer = make_optimizer(model, self.config)
            if stage.optimizer_state != "reset":
                migrate_optimizer_state(base_optimizer, base_names, optimizer, model, widened, stage.optimizer_state)
            self.install(model, optimizer, continued_scheduler(optimizer, self.config, seg.begin), ema=False)
            model.train()
            loader = self.loader(seg.data)
            for i, batch in enumerate(loader):
                if i >= stage.search_steps:
                    break
                if self.count_data(batch):
                    self.step(batch)
            metrics = self.evaluate(val, seg.begin + stage.search_steps)
            score = [_mean_r1(metrics)]
            if self.acc.num_processes > 1:  # only the main process evaluated
                broadcast_object_list(score)
            scores.append({"candidate": candidate, "val_mean_R@1": score[0],
                           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
            if best is None or score[0] > best["score"]:
                best = {"index": index, "score": score[0], "model": model,
                        "optimizer": getattr(self.optimizer, "optimizer", self.optimizer)}
            if self.acc.is_main_process:
                logger.info("stage %d candidate %s: validation mean R@1 %.2f", seg.index + 1, candidate, score[0])
        self.counts.update(seen=0, bad=0)
        self.ema, self.model = kept_ema, base  # the caller grows the base model like the winner
        return best, scores

    def evaluate(self, val: Any, step: int) -> dict[str, Any]:
        """Validation retrieval R@1/5/10 per language (computed on the main process, logged)."""
        metrics: dict[str, Any] = {}
        if self.acc.is_main_process:
            by_lang = evaluate_retrieval(self.model, val, batch_size=self.config.eval_batch_size,
                                         num_workers=self.data_config.num_workers)
            metrics = {f"val/{lang}/{name}": value for lang, values in by_lang.items()
                       for name, value in values.items() if "/" in name or name == "mean_recall"}
            self.acc.log(metrics, step=step)
        self.acc.wait_for_everyone()
        return {"step": step, **metrics}

    def _write_history(self, output: Path, history: list[dict[str, Any]]) -> None:
        if self.acc.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            tmp = output / ".history.jsonl.tmp"
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
            os.replace(tmp, output / "history.jsonl")


def _mean_r1(metrics: dict[str, Any]) -> float:
    """Mean of the i2t and t2i R@1 over the validation languages (how candidates are compared)."""
    values = [v for k, v in metrics.items() if k.endswith("/R@1")]
    return sum(values) / len(values) if values else 0.0


def grad_cache_backward(prepared: torch.nn.Module, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                        chunks: int, loss_fn: Callable, accelerator: Accelerator) -> float:
    """Backward of the whole batch's contrastive loss, holding activations of one micro-batch at a time.

    GradCache (Gao et al. 2021): embed every micro-batch without a graph, take the loss and its
    gradient w.r.t. the embeddings over the full batch (all negatives), then re-run each micro-batch
    with a graph and backpropagate those cached gradients. Each re-run replays the RNG state of its
    first pass, so dropout masks match and the gradient equals the full-batch one.
    """
    micro = _split(inputs, chunks)
    states, images, texts = [], [], []
    with torch.no_grad():
        for part in micro:
            states.append(_rng_snapshot())
            out = prepared(**part)
            images.append(out.image_embeds)
            texts.append(out.text_embeds)
    after = _rng_snapshot()
    image = torch.cat(images).detach().requires_grad_()
    text = torch.cat(texts).detach().requires_grad_()
    scale = model.scale().detach().requires_grad_()
    bias = model.logit_bias.detach().requires_grad_() if model.logit_bias is not None else None
    loss = loss_fn(image, text, scale, bias)
    wrt = [image, text, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    g_image, g_text = grads[0].split([len(x) for x in images]), grads[1].split([len(x) for x in texts])
    for i, part in enumerate(micro):
        last = i == chunks - 1
        _rng_restore(states[i])
        with (contextlib.nullcontext() if last else accelerator.no_sync(prepared)):
            out = prepared(**part)
            # Scale and bias take their whole-batch gradient once (on the last pass); 0 * x keeps them in
            # the graph of every pass so DDP sees every parameter used.
            surrogate = (out.image_embeds * g_image[i]).sum() + (out.text_embeds * g_text[i]).sum()
            surrogate = surrogate + out.logit_scale * (grads[2] if last else 0.0)
            if bias is not None:
                surrogate = surrogate + out.logit_bias * (grads[3] if last else 0.0)
            accelerator.backward(surrogate)
    _rng_restore(after)
    return float(loss.detach())


def _split(inputs: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    if chunks == 1:
        return [inputs]
    pieces = {k: v.chunk(chunks) for k, v in inputs.items()}
    return [{k: pieces[k][i] for k in inputs} for i in range(len(next(iter(pieces.values()))))]


def _rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _rng_restore(snapshot: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.random.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state_all(snapshot[1])


def _gather_object(accelerator: Accelerator, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object
    return gather_object([obj])


def _read_history(output: Path) -> list[dict[str, Any]]:
    file = output / "history.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []
