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
from tqdm.auto import tqdm

from . import state as ckpt
from .config import ConfigError, DataConfig, TrainConfig
from .data import DataError, PairCollator, image_transform, load_pairs, pair_loader
from .eval.retrieval import EmbeddedPairs, embed_pairs, evaluate_retrieval
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
    """Linear warm-up, then cosine / linear decay to zero, or constant."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if config.schedule == "linear" else 1.0
    return factor


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


def resolve_data(data: Any, data_config: DataConfig | None, seed: int) -> tuple[Any, Any, DataConfig]:
    """Training and validation tables from a spec string, a DataConfig or a ready `datasets` table."""
    if isinstance(data, DataConfig):
        data_config, data = data, None
    elif isinstance(data, (str, os.PathLike)):
        data_config = DataConfig.from_dict({**(data_config.to_dict() if data_config else {}), "source": str(data)})
        data = None
    data_config = data_config or DataConfig()
    options = dict(image_column=data_config.image_column, text_column=data_config.text_column,
                   lang_column=data_config.lang_column, langs=data_config.langs, seed=seed,
                   **data_config.options)
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
          data_config: DataConfig | None = None, val_data: Any = None) -> TrainResult:
    """Train the model's trainable parameters contrastively on image-text pairs; returns what happened."""
    config = config or TrainConfig()
    accelerator = _accelerator(config, model)
    set_seed(config.seed)  # dropout and any other draws of the loop; a resume restores its saved states instead
    data, val, data_config = resolve_data(data, data_config, config.seed)
    val = val_data if val_data is not None else val
    if config.batch_size % (accelerator.num_processes * config.accumulation_steps):
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} must divide evenly over "
                          f"{accelerator.num_processes} processes x {config.accumulation_steps} micro-batches.")
    if not isinstance(data, datasets.IterableDataset) and len(data) < config.batch_size:
        raise DataError(f"only {len(data)} training pairs for batch_size={config.batch_size}; lower the batch size.")
    output = Path(config.output_dir)
    collate = PairCollator(image_transform(model.vision.data_config, data_config.augment, train=True),
                           model.tokenize, seed=config.seed)
    loader = pair_loader(data, collate, config.batch_size, seed=config.seed, num_workers=data_config.num_workers,
                         pin_memory=data_config.pin_memory)
    if config.head_warmup_epochs and not _will_resume(config, output):
        warm_up_heads(model, data, config, data_config.num_workers, accelerator.is_main_process)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    loop = _Loop(accelerator, prepared, model, optimizer, scheduler, config, data_config, contrastive_loss(config))
    result = TrainResult(output, 0)
    start = loop.resume(output, result)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(config.to_json())
        (output / "data_config.json").write_text(data_config.to_json())
    accelerator.init_trackers("lilt", config={k: str(v) for k, v in config.to_dict().items()})
    loop.run(loader, start, val, result)
    accelerator.end_training()
    return result


def _will_resume(config: TrainConfig, output: Path) -> bool:
    return config.resume != "never" and (config.resume != "auto" or bool(ckpt.checkpoint_dirs(output)))


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
    """The step machinery shared by the training loop: forward/backward, logging, checkpoints, bad data."""

    def __init__(self, accelerator: Accelerator, prepared: torch.nn.Module, model: torch.nn.Module,
                 optimizer: Any, scheduler: Any, config: TrainConfig, data_config: DataConfig,
                 loss_fn: Callable) -> None:
        self.acc, self.prepared, self.model = accelerator, prepared, model
        self.optimizer, self.scheduler, self.config, self.data_config = optimizer, scheduler, config, data_config
        self.loss_fn = loss_fn
        self.counts = {"seen": 0, "bad": 0, "nonfinite_in_a_row": 0, "nonfinite": 0, "epoch": 0}
        self.bad_names: list[str] = []

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
        self.acc.wait_for_everyone()
        ckpt.save_rng(tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "steps_per_epoch": steps_per_epoch, "processes": self.acc.num_processes,
                     "counts": self.counts, "bad_names": self.bad_names}
            ckpt.finalize(tmp, final, state, self.config.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self, output: Path, result: TrainResult) -> int:
        """Load the checkpoint TrainConfig.resume points at; returns the step to continue from."""
        if self.config.resume == "never":
            return 0
        if self.config.resume == "auto":
            found = ckpt.checkpoint_dirs(output)
            if not found:
                return 0
            folder = found[-1]
        else:
            folder = Path(self.config.resume)
            if not (folder / ckpt.STATE_NAME).is_file():
                raise ConfigError(f"TrainConfig.resume={self.config.resume!r} is not a complete checkpoint "
                                  f"(no {ckpt.STATE_NAME}); use 'auto', 'never' or a checkpoints/step-N folder.")
        meta = ckpt.read_state(folder)
        from .model import read_manifest
        self.model.load_delta(folder / "model.safetensors", read_manifest(folder)["weights"]["sha256"])
        ckpt.load_optimizer(self.optimizer, folder)
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        ckpt.load_rng(folder, self.acc.process_index)
        self.counts.update(meta["counts"])
        self.bad_names = meta.get("bad_names", [])
        result.resumed_from = meta["step"]
        if self.acc.is_main_process:
            logger.info("resumed from %s (step %d)", folder, meta["step"])
        return meta["step"]

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, loader: Any, start: int, val: Any, result: TrainResult) -> None:
        """Train from step `start` to TrainConfig.steps, evaluating, logging and checkpointing on the way."""
        config, acc, output = self.config, self.acc, result.output_dir
        steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None
        if steps_per_epoch == 0:
            raise DataError("the training data gives no full batch; lower TrainConfig.batch_size.")
        epoch = start // steps_per_epoch if steps_per_epoch else self.counts["epoch"]
        skip = start - epoch * steps_per_epoch if steps_per_epoch else start
        step, samples, began = start, 0, time.perf_counter()
        bar = tqdm(total=config.steps, initial=start, disable=not acc.is_main_process, desc="train", unit="step")
        history = [h for h in _read_history(output) if h["step"] <= start] if start else []
        self.model.train()
        while step < config.steps:
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
                samples += config.batch_size
                rate = samples / (time.perf_counter() - began)
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
                if step >= config.steps:
                    break
            else:
                self.end_epoch(result)
                epoch += 1
        bar.close()
        result.steps, result.samples_per_second = step, samples / max(1e-9, time.perf_counter() - began)
        result.nonfinite_steps = self.counts["nonfinite"]
        result.bad_items += self.counts["bad"]
        if val is not None:
            final = self.evaluate(val, step)
            history.append(final)
            result.metrics = final
        result.history = history
        self._write_history(output, history)
        self.save(output, step, steps_per_epoch)
        if acc.is_main_process:
            self.model.save_pretrained(output / "model")

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
