"""The Accelerate training loop (`lilt.train`): contrastive loss over global negatives, exact resume, no NaN.

`train(model, data, TrainConfig(...))` runs the same from a notebook, `python -m lilt.cli train` or
`accelerate launch -m lilt.cli train`. The batch size is global: each step scores `batch_size` pairs
against each other whatever the number of processes (accelerate splits each batch across them).
The parts live where a maintainer looks for them: optimizer and schedule in `lilt.optim`, GradCache in
`lilt.gradcache`, growth stages in `lilt.staged`, checkpoints in `lilt.checkpoint`, unreadable items in
`lilt.data.bad_items`, non-finite values in `lilt.finite`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, skip_first_batches
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from . import checkpoint
from ._io import write_text
from .baselines import fit_ridge, heads_from_ridge
from .cache import CachedCollator, FeatureCache, build_cache, cache_refusal
from .config import DataConfig, TrainConfig
from .cpu_memory import reuse_freed_memory
from .data import PairCollator, image_transform, pair_loader, ssl_view_transform
from .data.loader import language_weights
from .data.bad_items import BadItems
from .data.identity import image_ids
from .data.parallel import ParallelBatches, parallel_of
from .data.resolve import resolve_data
from .errors import ConfigError, DataError, NonFiniteError
from .eval.retrieval import EmbeddedPairs, embed_pairs, evaluate_retrieval
from .finite import FiniteGuard
from .frozen_precision import frozen_weights_in, native_bf16
from .gradcache import grad_cache_backward, split_inputs
from .interpolation import choose_alpha, interpolate, trainable_state
from .growth.grower import replay_growth
from .hub import training_summary
from .losses import clip_loss, siglip_loss, simclr_loss
from .optim import adamw, lr_lambda, make_optimizer, param_groups
from .staged import Segment, grow_stage, needs_growth, stage_segments
from .supervise import exit_with_parent

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "contrastive_loss", "train", "warm_up_heads"]

SCORE = "val/all/mean_recall"  # what keep_best and WiSE-FT's alpha maximize


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


def contrastive_loss(config: TrainConfig) -> Callable[..., torch.Tensor]:
    """The configured loss as f(image_embeds, text_embeds, logit_scale, logit_bias, image_ids=None)."""
    if config.loss == "siglip":
        def siglip(img, txt, scale, bias, image_ids=None):
            if bias is None:
                raise ConfigError("loss 'siglip' needs a logit bias: build the model with logit_bias=-10.")
            return siglip_loss(img.float(), txt.float(), scale, bias, image_ids=image_ids)
        return siglip

    # Embeddings may come out of autocast in half precision; the softmax over the batch wants fp32.
    def clip(img, txt, scale, bias, image_ids=None):
        return clip_loss(img.float(), txt.float(), scale, local_loss=config.local_loss, image_ids=image_ids)
    return clip


def parallel_loss(out: Any) -> torch.Tensor:
    """InfoNCE between target-language embeddings and their (fixed) pivot embeddings, over the global batch."""
    return clip_loss(out.parallel_target.float(), out.parallel_source.float(), out.logit_scale.detach())


def _accelerator(config: TrainConfig, model: torch.nn.Module) -> Accelerator:
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    precision = None if config.mixed_precision == "auto" else config.mixed_precision
    # A contrastive loss that leaves the logit bias unused would make DDP wait for its gradient forever.
    unused = getattr(model, "logit_bias", None) is not None and config.loss != "siglip"
    try:
        return _make_accelerator(config, precision, multi, unused)
    except ValueError as err:  # e.g. a tracker accelerate does not know
        raise ConfigError(f"TrainConfig: accelerate refused the run's settings (report_to={config.report_to}, "
                          f"mixed_precision={config.mixed_precision!r}): {err}") from None


def _make_accelerator(config: TrainConfig, precision: str | None, multi: bool, unused: bool) -> Accelerator:
    return Accelerator(
        mixed_precision=precision, log_with=config.report_to or None, project_dir=config.output_dir,
        # `accelerate launch --multi_gpu` on a machine without GPUs: run the processes on CPU with gloo.
        cpu=multi and not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def reset_accelerate_state() -> None:
    """Forget accelerate's per-process settings, so that the next `train` in this process sets its own precision.

    accelerate keeps one mixed precision per process: after a bf16 run, a run with mixed_precision 'auto' is bf16
    too, and one asking for another precision is refused. Call it between such runs in one process (a notebook, a
    benchmark); never inside `accelerate launch`, whose processes share that state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()


def train(model: torch.nn.Module, data: Any = None, config: TrainConfig | None = None, *,
          data_config: DataConfig | None = None, val_data: Any = None,
          on_stage_end: Callable[[torch.nn.Module, int, int], dict[str, Any]] | None = None) -> TrainResult:
    """Train the model's trainable parameters contrastively on image-text pairs; returns what happened.

    With `TrainConfig.growth` the run goes in stages: each trains on the data revealed so far and may
    first grow the model in place (lilt.growth); `on_stage_end(model, stage, step)` may return extra
    metrics recorded with each stage.
    """
    config = config or TrainConfig()
    exit_with_parent()  # an `accelerate launch` worker whose launcher was killed stops too
    accelerator = _accelerator(config, model)
    low_frozen = config.frozen_dtype == "bfloat16"
    if low_frozen and accelerator.mixed_precision != "bf16":  # 'auto' resolved to something else
        raise ConfigError(f"TrainConfig.frozen_dtype='bfloat16' needs bf16 autocast, but this run's mixed precision "
                          f"is {accelerator.mixed_precision!r}: set train.mixed_precision=bf16 (or `accelerate launch "
                          "--mixed_precision bf16`), or train.frozen_dtype=float32.")
    if accelerator.mixed_precision == "bf16" and not native_bf16(accelerator.device):
        logger.warning("train: bf16 autocast on %s, which has no native bf16 (AVX512-BF16 or AMX): each kernel "
                       "converts to fp32 and back, so steps are slower than in fp32 (activations still take half the "
                       "memory). For speed set train.mixed_precision=no (and train.frozen_dtype=float32).",
                       accelerator.device)
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
            filters = {k: v for k, v in data_config.to_dict().items()
                       if k in ("langs", "pairs_per_lang", "max_pairs", "options") and v not in (None, {}, [])}
            raise DataError(f"only {len(seg.data)} training pairs{where} from {data_config.source!r}"
                            + (f" (after data.{', data.'.join(f'{k}={v}' for k, v in filters.items())})"
                               if filters else "")
                            + f" for batch_size={config.batch_size}; lower the batch size"
                            + (" or reveal more data in that stage." if config.growth else " or widen the data."))
    if any(seg.stage is not None and seg.stage.candidates for seg in segments) and val is None:
        raise ConfigError("a growth stage with candidates compares them by validation recall; give validation "
                          "pairs (DataConfig.val_source, or a builtin source with a validation split).")
    output = Path(config.output_dir)
    # A model loaded from a grown checkpoint carries growth records that are not this run's.
    grown_before = len(getattr(model, "growth", []))
    folder = _resume_folder(config, output)
    if folder is not None:  # rebuild what the checkpoint's run had grown, so its tensors and optimizer fit
        history = checkpoint.read_manifest(folder)["growth"]
        replay_growth(model, history[len(model.growth):])
    # SLIP's two extra views are drawn only when it is on: with ssl_weight 0 no random draw moves.
    views = ssl_view_transform(model.vision.data_config, config.ssl_augment) if config.ssl_weight else None
    collate = PairCollator(image_transform(model.vision.data_config, data_config.augment, train=True),
                           model.tokenize, seed=config.seed, views=views)
    parallel = parallel_batches(model, config, data_config, accelerator)
    if (config.head_warmup_epochs or config.head_init == "ridge") and folder is None:
        warm_up_heads(model, segments[0].data, config, data_config.num_workers, accelerator.is_main_process,
                      val=val)
    prepare_ssl_head(model, config)
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(config.gradient_checkpointing)
    features = feature_cache(model, config, data_config, segments[0].data, accelerator)
    if features is not None:
        collate = CachedCollator(features.image_of_row, features.text_of_row, features.bad, config.seed,
                                 features.views, tokenize=None if features.texts_cached else model.tokenize)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    loop = TrainLoop(accelerator, model, config, data_config, contrastive_loss(config), collate)
    loop.parallel = parallel
    loop.features = features
    # WiSE-FT's theta_0: the start of tuning, after the head warm-up (a resume reads it from the checkpoint).
    loop.reference = trainable_state(model) if config.wise_alphas and folder is None else None
    loop.grown_before = grown_before
    loop.install(model, optimizer, scheduler)
    result = TrainResult(output, 0, model=model)
    start = 0
    if folder is not None:
        start = result.resumed_from = checkpoint.restore_training_state(loop, folder)
        if accelerator.is_main_process:
            logger.info("resumed from %s (step %d)", folder, start)
    if accelerator.is_main_process:
        write_text(output / "train_config.json", config.to_json())
        write_text(output / "data_config.json", data_config.to_json())
    accelerator.init_trackers("lilt", config={k: str(v) for k, v in config.to_dict().items()})
    with frozen_weights_in(model, torch.bfloat16, enabled=low_frozen), \
            reuse_freed_memory(config.reuse_cpu_memory and accelerator.device.type == "cpu"):
        loop.run(segments, start, val, result, on_stage_end)
    accelerator.end_training()
    return result


def parallel_batches(model: torch.nn.Module, config: TrainConfig, data_config: DataConfig,
                     accelerator: Accelerator) -> ParallelBatches | None:
    """The run's parallel-text batches (DataConfig.parallel), or None when it has none."""
    if data_config.parallel is None or config.parallel_weight == 0:
        return None
    if config.accumulation_steps > 1 and config.accumulation == "gradcache":
        raise ConfigError("parallel text (DataConfig.parallel) runs with plain accumulation only; set "
                          "train.accumulation=plain or accumulation_steps=1.")
    size = config.parallel_batch_size or config.batch_size
    if size % accelerator.num_processes:
        raise ConfigError(f"TrainConfig.parallel_batch_size={size} must divide evenly over "
                          f"{accelerator.num_processes} processes.")
    return ParallelBatches(parallel_of(data_config, config.seed), model.tokenize, size, config.seed,
                           accelerator.process_index, accelerator.num_processes)


def feature_cache(model: torch.nn.Module, config: TrainConfig, data_config: DataConfig, data: Any,
                  accelerator: Accelerator) -> FeatureCache | None:
    """The run's feature cache (train.cache: auto, a heads-only plan), on the training device; else None."""
    if config.cache == "off":
        return None
    reason = cache_refusal(model, config, data_config, data)
    if reason is not None:
        logger.info("train.cache=auto: training without the feature cache: %s", reason)
        return None
    if accelerator.num_processes > 1:
        raise ConfigError(f"train.cache=auto runs on one process so far; this run has {accelerator.num_processes}. "
                          "Set train.cache=off or train on one process (the heads alone train fast there).")
    return build_cache(model, data, config, data_config, progress=accelerator.is_main_process).to(accelerator.device)


def prepare_ssl_head(model: torch.nn.Module, config: TrainConfig) -> None:
    """SLIP on: give the model its SSL head (trained with it). Off: freeze a head a loaded model brings along,
    so that no unused parameter waits for a gradient."""
    if config.ssl_weight:
        model.add_ssl_head()
    elif getattr(model, "ssl_head", None) is not None:
        model.ssl_head.requires_grad_(False)


def _resume_folder(config: TrainConfig, output: Path) -> Path | None:
    """The checkpoint TrainConfig.resume points at (checked against its manifest), or None to start afresh."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return checkpoint.latest_checkpoint(output)
    folder = Path(config.resume)
    if not (folder / checkpoint.MANIFEST_NAME).is_file():
        raise ConfigError(f"TrainConfig.resume={config.resume!r} is not a complete checkpoint (no "
                          f"{checkpoint.MANIFEST_NAME}); use 'auto', 'never' or a checkpoints/step-N folder.")
    checkpoint.verify_state(folder)
    return folder


def warm_up_heads(model: torch.nn.Module, data: datasets.Dataset, config: TrainConfig, num_workers: int = 0,
                  progress: bool = True, features: EmbeddedPairs | None = None, val: Any = None) -> list[float]:
    """Fit the projection heads and temperature by InfoNCE on frozen features of the training pairs (LP-FT).

    Kumar et al. (ICLR 2022) show that fine-tuning from a fitted linear head distorts pretrained features
    less than fine-tuning from a random one. The features are computed once, in eval mode, with the plan's
    added modules still at their identity initialization. Every process computes the same thing, so
    the heads agree without communication. Weight decay falls on the head matrices only, as in training.
    With `head_init: ridge` the heads first take the closed-form ridge map's solution (its alpha chosen on
    `val` when given). Returns the mean loss of each epoch.
    """
    if isinstance(data, datasets.IterableDataset):
        raise ConfigError("head_warmup_epochs needs a map-style dataset (the features are computed once).")
    if features is None:  # `features`: the same, already computed (the demo shares them with its baselines)
        features = embed_pairs(model, data, features=True, batch_size=config.eval_batch_size,
                               num_workers=num_workers)
    if config.head_init == "ridge":
        val_features = val if val is None or isinstance(val, EmbeddedPairs) else embed_pairs(
            model, val, features=True, batch_size=config.eval_batch_size, num_workers=num_workers)
        heads_from_ridge(model, fit_ridge(features, val=val_features), features.texts)
    images, texts = features.images[features.text_image].to(model.device), features.texts.to(model.device)
    heads = [(n, p) for n, p in model.named_parameters()
             if n.split(".")[0] in ("vision_proj", "text_proj") or n == "logit_scale"]
    groups = param_groups(heads, config.weight_decay)  # a text-tower swap keeps the vision head frozen
    optimizer = adamw(groups, config.head_warmup_lr, tuple(config.betas))
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(config.head_warmup_batch_size or config.batch_size, len(texts))
    losses = []
    for _ in tqdm(range(config.head_warmup_epochs), desc="head warm-up", disable=not progress, leave=False):
        order, total = torch.randperm(len(texts), generator=generator), 0.0
        for start in range(0, len(texts) - batch + 1, batch):
            rows = order[start:start + batch]
            image = F.normalize(model.vision_proj(images[rows]), dim=-1)
            text = F.normalize(model.text_proj(texts[rows]), dim=-1)
            # Rows of one image (one row per caption) share its features: never each other's negatives.
            loss = clip_loss(image, text, model.scale(), gather=False, image_ids=features.text_image[rows])
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the head warm-up reached a non-finite loss; lower TrainConfig.head_warmup_lr "
                                     f"(now {config.head_warmup_lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / max(1, len(texts) // batch))
    return losses


class TrainLoop:
    """One run's moving parts (prepared model, optimizer, schedule, EMA) and the step loop over them."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig,
                 data_config: DataConfig, loss_fn: Callable, collate: PairCollator) -> None:
        self.acc, self.model, self.config, self.data_config = accelerator, model, config, data_config
        self.prepared: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.loss_fn, self.collate = loss_fn, collate
        self.bad = BadItems(accelerator, data_config.max_bad_fraction, data_config.bad_window)
        self.nonfinite = self.nonfinite_in_a_row = self.epoch = self.epoch_begin = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self.grown_before = 0
        self.parallel: ParallelBatches | None = None
        self.reference: dict[str, torch.Tensor] | None = None  # WiSE-FT's theta_0
        self.best: dict[str, torch.Tensor] | None = None  # keep_best: the best weights so far, and their score
        self.best_score, self.best_step = -math.inf, 0
        self.image_ids: torch.Tensor | None = None  # per row of the current table, when some image has 2+ rows
        self.features: FeatureCache | None = None  # train.cache: pooled tower outputs looked up per batch
        self.ssl_loss = math.nan  # SLIP: the last step's SimCLR term (before its weight), logged beside the loss

    def install(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                ema: bool = True) -> None:
        """Prepare a (new or grown) model with its optimizer and scheduler, dropping the previous ones."""
        if self.prepared is not None:
            if hasattr(self.prepared, "_remove_autograd_hooks"):
                # DDP's reducer hooks the parameters it was built on; a stale one would all-reduce them again.
                # (No public API releases them; the method exists on torch's DistributedDataParallel only.)
                self.prepared._remove_autograd_hooks()
            self.acc.free_memory()
            self.prepared = None
        self.prepared, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        self.model = model
        self.guard = FiniteGuard(model)
        if self.config.ema_decay is not None and ema:  # after prepare: DDP has made every process's weights equal
            old = self.ema or {}
            self.ema = {n: old[n] if n in old and old[n].shape == p.shape else p.detach().clone()
                        for n, p in model.named_parameters() if p.requires_grad}

    def loader(self, data: Any) -> Any:
        """A prepared loader over one stage's table."""
        alpha = self.data_config.lang_sampling
        if alpha is not None and "lang" not in getattr(data, "column_names", []):
            raise DataError("DataConfig.lang_sampling weights languages; this data has no language column "
                            "(name it with data.lang_column).")
        weights = language_weights(data["lang"], alpha) if alpha is not None else None
        self.image_ids = None
        if isinstance(data, datasets.Dataset):  # a stream's rows cannot be grouped ahead (its images stay apart)
            ids = image_ids(data)
            self.image_ids = torch.from_numpy(ids) if len(ids) and ids.max() + 1 < len(ids) else None
        workers = self.data_config.num_workers
        if self.features is not None:  # the collate only looks up indices: no images to read, no workers to start
            data, workers = data.remove_columns("image"), 0
        loader = pair_loader(data, self.collate, self.config.batch_size, seed=self.config.seed, weights=weights,
                             num_workers=workers, pin_memory=self.data_config.pin_memory)
        return self.acc.prepare(loader)

    # -- one step ------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], step: int) -> float:
        """Optimizer step `step` on a batch (micro-batched when configured); returns the loss (nan: skipped)."""
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "ssl_views")
                  if k in batch}
        if self.features is not None:
            inputs = self.features.inputs(batch)
        chunks = self.config.accumulation_steps
        ids = self.image_ids[batch["rows"].cpu()].to(self.acc.device) if self.image_ids is not None else None
        self.guard.before_step()
        if chunks > 1 and self.config.accumulation == "gradcache":
            loss = grad_cache_backward(self.prepared, self.model, inputs, chunks, self.loss_fn, self.acc,
                                       image_ids=ids)
        else:
            loss = self._plain_backward(inputs, chunks, self.parallel(step) if self.parallel else None, ids)
        # One collective for two facts: whether every process has a finite loss, and the global mean loss
        # (with local_loss each process holds only its share).
        stats = torch.tensor([float(math.isfinite(loss)), loss if math.isfinite(loss) else 0.0], device=self.acc.device)
        finite, loss = self.acc.reduce(stats, "sum").tolist()
        loss /= self.acc.num_processes
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Every process takes the same decision (the loss is reduced, gradients are all-reduced), so none
        # waits in a collective the others skipped.
        if int(finite) < self.acc.num_processes or not self.guard.gradients_finite(params):
            return self._skip(step)
        self.nonfinite_in_a_row = 0
        if self.config.max_grad_norm is not None:
            self.acc.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.check_after_step(step, f"Lower TrainConfig.lr (now {self.config.lr}) or enable max_grad_norm.")
        if self.ema is not None:
            names = list(self.ema)
            current = dict(self.model.named_parameters())
            with torch.no_grad():
                for name in names:
                    self.ema[name].lerp_(current[name].detach(), 1.0 - self.config.ema_decay)
        return loss

    def _skip(self, step: int) -> float:
        """A step whose loss or gradient was not finite: no update, BatchNorm statistics restored."""
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.undo_step()
        self.nonfinite += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {step}: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (each was "
                "skipped); lower the learning rate (TrainConfig.lr), enable clipping (max_grad_norm), check the "
                "data, or use mixed_precision='bf16' not 'fp16'.")
        return float("nan")

    def _plain_backward(self, inputs: dict[str, torch.Tensor], chunks: int,
                        parallel: dict[str, torch.Tensor] | None = None, ids: torch.Tensor | None = None) -> float:
        total, ssl_total = 0.0, 0.0
        micro_ids = ids.chunk(chunks) if ids is not None else [None] * chunks
        for i, micro in enumerate(split_inputs(inputs, chunks)):
            sync = self.acc.no_sync(self.prepared) if i < chunks - 1 else contextlib.nullcontext()
            with sync:
                # The whole parallel batch rides with the last micro-batch (the one that synchronizes).
                extra = {"parallel": parallel} if parallel is not None and i == chunks - 1 else {}
                out = self.prepared(**micro, **extra)
                same = {"image_ids": micro_ids[i]} if micro_ids[i] is not None else {}
                loss = self.loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias, **same) / chunks
                if out.parallel_target is not None:
                    loss = loss + self.config.parallel_weight * parallel_loss(out)
                if out.ssl_a is not None:  # SLIP: SimCLR between the two extra views, per micro-batch
                    ssl = simclr_loss(out.ssl_a.float(), out.ssl_b.float(), self.config.ssl_temperature)
                    loss = loss + self.config.ssl_weight * ssl / chunks
                    ssl_total += float(ssl.detach()) / chunks
                self.acc.backward(loss)
            total += float(loss.detach())
        self.ssl_loss = ssl_total
        return total

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, segments: list[Segment], start: int, val: Any, result: TrainResult,
            on_stage_end: Callable | None = None) -> None:
        """Train from step `start` to TrainConfig.steps, stage by stage, evaluating, logging and checkpointing."""
        config, acc, output = self.config, self.acc, result.output_dir
        bar = tqdm(total=config.steps, initial=start, disable=not acc.is_main_process, desc="train", unit="step")
        history = [h for h in _read_history(output) if h["step"] <= start] if start else []
        result.stages = [h["stage_end"] for h in history if "stage_end" in h]
        clock = {"began": time.perf_counter(), "samples": 0}
        for seg in segments:
            if start >= seg.end:
                continue
            if needs_growth(self, seg, start):
                start = grow_stage(self, seg, val, history)
                bar.update(start - seg.begin)
            self.model.train()
            self.train_segment(seg, start, val, result, history, bar, clock)
            start = seg.end
            if config.growth:
                self._stage_summary(seg, val, result, history, on_stage_end)
        bar.close()
        self.bad.finish()
        result.steps = config.steps
        result.samples_per_second = clock["samples"] / max(1e-9, time.perf_counter() - clock["began"])
        result.nonfinite_steps = self.nonfinite
        result.bad_items = self.bad.total
        result.model = self.model
        # The last resumable state is the tuned one: a resume from it replays the choices below exactly.
        checkpoint.save_training_state(self, output, config.steps, None)
        if val is not None:
            final = self.evaluate(val, config.steps)
            final = self._finish(val, final)
            history.append(final)
            result.metrics = final
            if result.stages:  # the last stage's summary carries the final validation metrics
                result.stages[-1].update({k: v for k, v in final.items() if k != "step"})
        result.history = history
        self._write_history(output, history)
        if acc.is_main_process:
            summary = training_summary(self.data_config, config, segments[-1].data, result.metrics)
            self.model.save_pretrained(output / "model", training=summary)
        acc.wait_for_everyone()

    def _finish(self, val: Any, final: dict[str, Any]) -> dict[str, Any]:
        """keep_best, then WiSE-FT: the end-of-run choices on validation; returns the final metrics."""
        if self.config.keep_best and self.best is not None:
            better = self._agree(self.best_score > final.get(SCORE, -math.inf))
            if better:
                self._load(self.best)
                final = {**self.evaluate(val, self.config.steps), "best_step": self.best_step}
        if self.config.wise_alphas and self.reference is not None:
            best, scores = 1.0, {}
            if self.acc.is_main_process:  # validation runs there; choose_alpha leaves this copy at the best
                best, scores = choose_alpha(self.model, self.reference, lambda _: self._score(val),
                                            sorted(set(self.config.wise_alphas)))
            best = self._agree(best)
            if not self.acc.is_main_process:
                interpolate(self.model, best, self.reference)
            final = {**self.evaluate(val, self.config.steps), "wise_alpha": best,
                     **{f"wise/{a:g}": v for a, v in scores.items()}}
        return final

    def _score(self, val: Any) -> float:
        by_lang = evaluate_retrieval(self.model, val, batch_size=self.config.eval_batch_size,
                                     num_workers=self.data_config.num_workers)
        return float(by_lang["all"]["mean_recall"])

    def _agree(self, value: Any) -> Any:
        """The main process's value, on every process (a choice made where validation ran)."""
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def track_best(self, metrics: dict[str, Any], step: int) -> None:
        """keep_best: remember these weights when their validation score beats every earlier one."""
        if not self.config.keep_best:
            return
        score = self._agree(metrics.get(SCORE, -math.inf))  # only the main process evaluated
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            self.best = trainable_state(self.model)

    def _stage_summary(self, seg: Segment, val: Any, result: TrainResult, history: list[dict[str, Any]],
                       on_stage_end: Callable | None) -> None:
        summary = {"stage": seg.index + 1, "step": seg.end, "pairs": len(seg.data),
                   "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                   "growth": [r["op"] for r in self.model.growth[self.grown_before:]
                              if r.get("stage") == seg.index + 1]}
        if val is not None and seg.end < self.config.steps:
            summary.update({k: v for k, v in self.evaluate(val, seg.end).items() if k != "step"})
        if on_stage_end is not None:
            summary.update(on_stage_end(self.model, seg.index + 1, seg.end) or {})
        result.stages.append(summary)
        history.append({"step": seg.end, "stage_end": summary})

    def train_segment(self, seg: Segment, start: int, val: Any, result: TrainResult, history: list[dict[str, Any]],
                      bar: Any, clock: dict[str, float]) -> None:
        """Steps [start, seg.end) on the segment's data."""
        config, output = self.config, result.output_dir
        loader = self.loader(seg.data)
        steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None
        if steps_per_epoch == 0:
            raise DataError("the training data gives no full batch; lower TrainConfig.batch_size.")
        done = start - seg.begin
        if steps_per_epoch:
            epoch, skip = divmod(done, steps_per_epoch)
        else:  # a stream has no length: the checkpoint recorded where its epoch began
            epoch, skip = self.epoch, start - max(self.epoch_begin, seg.begin)
        step = start
        self.epoch, self.epoch_begin = epoch, start - skip
        while step < seg.end:
            batches = epoch_batches(loader, epoch, skip)
            skip = 0
            for batch in batches:
                loss = self.step(batch, step + 1) if self.bad.count(batch) else float("nan")
                step += 1
                self._log(step, loss, bar, clock, history)
                if val is not None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    history.append(self.evaluate(val, step))
                    self.track_best(history[-1], step)
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    self._write_history(output, history)
                    checkpoint.save_training_state(self, output, step, steps_per_epoch)
                if step >= seg.end:
                    break
            else:
                self.bad.end_epoch(epoch)
                epoch += 1
                self.epoch, self.epoch_begin = epoch, step

    def _log(self, step: int, loss: float, bar: Any, clock: dict[str, float], history: list[dict[str, Any]]) -> None:
        clock["samples"] += self.config.batch_size
        rate = clock["samples"] / (time.perf_counter() - clock["began"])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", sps=f"{rate:.1f}")
        if step % self.config.log_every == 0 or step == self.config.steps:
            entry = {"step": step, "loss": loss if math.isfinite(loss) else None,
                     "lr": self.scheduler.get_last_lr()[0],
                     "temperature": float(1 / self.model.scale().detach()), "samples_per_second": rate,
                     "seconds": time.perf_counter() - clock["began"]}
            if self.config.ssl_weight:  # the loss above includes ssl_weight times this
                entry["ssl_loss"] = self.ssl_loss if math.isfinite(self.ssl_loss) and math.isfinite(loss) else None
            self.acc.log({k: v for k, v in entry.items() if k != "step" and v is not None}, step=step)
            history.append(entry)

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
            write_text(output / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _read_history(output: Path) -> list[dict[str, Any]]:
    file = output / "history.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []


def epoch_batches(loader: Any, epoch: int, skip: int = 0) -> Any:
    """A prepared loader's batches of `epoch`, from batch `skip` on (a resumed epoch skips those already done).

    The epoch is set on the prepared loader itself: its set_epoch reaches the EpochSampler on any number of
    processes, whereas a skip_first_batches copy's stops at accelerate's BatchSamplerShard on several and
    would leave the sampler at epoch 0. The copy shares the sampler and starts from the loader's epoch.
    """
    loader.set_epoch(epoch)
    return skip_first_batches(loader, skip) if skip else loader
