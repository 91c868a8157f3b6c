"""One measurement of benchmarks/speed.py, run in a fresh process: build a model through lilt or open_clip,
time its training steps (forward / backward / optimizer), its no-grad forward, or a whole `lilt.train` run.

The parent (`speed.py`) starts `python benchmarks/speed.py --child SPEC` once per (config, builder, round) and
reads the JSON this prints last; the process's peak resident memory is therefore that one configuration's.

open_clip is configured with lilt's towers: `CustomTextCLIP` with a timm vision trunk of the same
architecture (avg pool, linear projection) and an HF text encoder of the same folder (linear projection,
the tower's pooling); both trunks are created empty and get the same weights by a strict state-dict copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lilt.config import DataConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig
from lilt.cpu_memory import reuse_freed_memory
from lilt.frozen_precision import frozen_weights_in
from lilt.data.transforms import decode_image, image_transform
from lilt.model import DualEncoder
from lilt.optim import make_optimizer
from lilt.plan import TuningPlan, apply_plan
from lilt.towers.packaged import is_packaged, packaged_info, packaged_path
from lilt.towers.vision import vision_folder
from lilt.training import contrastive_loss, train

REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "recipes" / "methods"


@dataclass
class Spec:
    """What one child process measures."""

    config: str  # a key of CONFIGS (step rows) or E2E (end-to-end rows)
    builder: str  # lilt | open_clip
    vision: str
    text: str
    image_size: int
    tokens: int
    batch_size: int
    steps: int
    warmup: int
    threads: int
    device: str
    embed_dim: int = 256
    data: str | None = None  # end-to-end rows: a save_to_disk folder of the training pairs
    pairs: int = 0
    epochs: int = 5
    num_workers: int = 2


# -- trainable sets -------------------------------------------------------------------------------------------
def _plan(rules: list[dict[str, Any]], name: str) -> Callable[[], TuningPlan]:
    return lambda: TuningPlan.from_dict({"name": name, "rules": rules})


def _recipe(name: str) -> Callable[[], TuningPlan]:
    return lambda: TuningPlan.from_recipe(METHODS / f"{name}.yaml")


LOCK_ALL = [{"tower": "both", "method": "lock", "layers": "all"}]
# Step rows: lilt's plan, and the open_clip set it is compared with (None: open_clip has no such set).
CONFIGS: dict[str, tuple[Callable[[], TuningPlan], str | None]] = {
    "full": (_recipe("full"), "full"),
    "lock-image": (_recipe("lock-image"), "lock-image"),
    "layernorm": (_recipe("layernorm"), "layernorm"),
    "text-ln": (_plan([{"tower": "text", "method": "layernorm", "layers": "all"}], "text-ln"), "text-ln"),
    "heads": (_plan(LOCK_ALL, "heads"), "heads"),
    "lwa": (_recipe("lwa"), None),
    "lora": (_recipe("lora"), None),
    "bitfit": (_recipe("bitfit"), None),
    # The same plans with train.gradient_checkpointing: blocks keep only their input for the backward.
    "lwa-ckpt": (_recipe("lwa"), None),
    "layernorm-ckpt": (_recipe("layernorm"), None),
}
CHECKPOINTED = {"lwa-ckpt", "layernorm-ckpt"}
# The same plans under bf16 autocast, as lilt.train runs them with train.mixed_precision=bf16 (benchmarks/claims.py's
# lwa+bf16 row measures what it does to accuracy).
CONFIGS.update({f"{plan}-bf16": (_recipe(plan), None) for plan in ("full", "lwa", "layernorm", "lora", "bitfit")})
CONFIGS.update({f"{plan}-ckpt-bf16": (_recipe(plan), None) for plan in ("lwa", "layernorm")})  # both at once
BF16 = {"full-bf16", "lwa-bf16", "layernorm-bf16", "lora-bf16", "bitfit-bf16", "lwa-ckpt-bf16", "layernorm-ckpt-bf16"}
CHECKPOINTED |= {"lwa-ckpt-bf16", "layernorm-ckpt-bf16"}
# What lilt.lean buys in the vision tower, where the activations are: the same plans with
# VisionConfig.lean_backward off (frozen convolutions keep their input, BatchNorm+activation its input and
# output, as stock PyTorch / timm layers do); the text tower's frozen Linear layers stay lean in both.
CONFIGS.update({"lwa-stock": (_recipe("lwa"), None), "lwa-bf16-stock": (_recipe("lwa"), None)})
BF16 |= {"lwa-bf16-stock"}
STOCK = {"lwa-stock", "lwa-bf16-stock"}
# bf16 autocast with the frozen Linear, convolution and embedding weights stored in bf16 (train.frozen_dtype=bfloat16,
# lilt/frozen_precision.py): the same layer outputs under autocast, half the memory those weights hold.
LOW_FROZEN = {f"{plan}-bf16-fw" for plan in ("lwa", "layernorm", "lora", "bitfit")}
CONFIGS.update({name: (_recipe(name.split("-")[0]), None) for name in sorted(LOW_FROZEN)})
# The floor of every plan that trains in each block: only the norms of each tower's bottom block train, so the
# backward still runs the input gradient through every frozen block above it but computes no other weight gradient.
FLOOR_PLAN = _plan([{"tower": "both", "method": "layernorm", "layers": "bottom:1"}], "floor")
CONFIGS.update({"floor": (FLOOR_PLAN, None), "floor-bf16-fw": (FLOOR_PLAN, None)})
LOW_FROZEN |= {"floor-bf16-fw"}
BF16 |= LOW_FROZEN
# End-to-end rows (lilt.train over builtin:emoji-cldr pairs): lilt's plan and train.cache, or open_clip's set.
E2E: dict[str, tuple[str, Callable[[], TuningPlan] | None, str]] = {
    "e2e-heads-cache": ("lilt", _plan(LOCK_ALL, "heads"), "auto"),
    "e2e-deep-cache": ("lilt", _recipe("deep"), "auto"),
    "e2e-heads-nocache": ("lilt", _plan(LOCK_ALL, "heads"), "off"),
    "e2e-open_clip-heads": ("open_clip", None, "heads"),
}


# -- lilt ----------------------------------------------------------------------------------------------------
def lilt_model(spec: Spec, plan: TuningPlan) -> DualEncoder:
    """lilt's DualEncoder on the spec's towers with `plan` applied."""
    vision = {"name": spec.vision, "image_size": spec.image_size, "lean_backward": spec.config not in STOCK}
    config = ModelConfig(vision=VisionConfig.from_dict(vision),
                         text=TextConfig.from_dict({"name": spec.text, "max_length": spec.tokens}),
                         embed_dim=spec.embed_dim)
    model = DualEncoder(config)
    apply_plan(model, plan)
    return model


def lilt_step_parts(spec: Spec) -> tuple[torch.nn.Module, Callable, Callable, torch.optim.Optimizer]:
    """lilt through its own model, plan, loss and optimizer: (model, forward -> loss, no-grad forward, optimizer)."""
    model = lilt_model(spec, CONFIGS[spec.config][0]()).to(spec.device).train()
    model.set_gradient_checkpointing(spec.config in CHECKPOINTED)
    train_config = TrainConfig()
    loss_fn = contrastive_loss(train_config)

    def autocast() -> Any:
        return torch.autocast(spec.device.split(":")[0], dtype=torch.bfloat16, enabled=spec.config in BF16)

    def forward(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = model(pixel_values=images, input_ids=ids, attention_mask=torch.ones_like(ids))
        return loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)

    def encode(images: torch.Tensor, ids: torch.Tensor) -> Any:
        with autocast():
            return (model.encode_image(images),
                    model.encode_text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))

    return model, forward, encode, make_optimizer(model, train_config)


# -- open_clip -----------------------------------------------------------------------------------------------
def text_conventions(name: str) -> tuple[Path, str, str]:
    """(folder, pooling, caption prefix) of a text backbone name, as lilt's text tower reads them."""
    from lilt.towers.text import _resolve_source  # the one place lilt decides a backbone's pooling and prefix

    if is_packaged(name):
        info = packaged_info(name)
        return packaged_path(name), info.pooling or "cls", info.text_prefix
    source, conventions = _resolve_source(TextConfig.from_dict({"name": name}))
    return Path(source), conventions["pooling"] or "cls", conventions["prefix"] or ""


def open_clip_model(spec: Spec, trainable: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """open_clip's CustomTextCLIP over the same towers (weights copied strictly), with `trainable` set by its
    lock flags (and by hand where it has none); returns the model and notes on what was patched."""
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import load_file

    vision_dir = vision_folder(VisionConfig.from_dict({"name": spec.vision}))
    if vision_dir is None:
        raise SystemExit(f"speed.py: the vision backbone {spec.vision!r} is not a local folder; open_clip is built "
                         "from one (packaged:NAME or a timm save_for_hf directory).")
    vision_json = json.loads((vision_dir / "config.json").read_text())
    # open_clip's TimmModel sets the classifier and pooling itself and passes no other timm argument.
    shape_args = {k: v for k, v in (vision_json.get("model_args") or {}).items()
                  if k not in ("num_classes", "global_pool") and (k, v) != ("in_chans", 3)}
    if shape_args:
        raise SystemExit(f"speed.py: {vision_dir} was built with timm arguments {shape_args}, which open_clip's "
                         "TimmModel cannot pass on; use a backbone without them (e.g. a tiny EfficientNet).")
    text_dir, pooling, _ = text_conventions(spec.text)
    pooler = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}[pooling]
    vision_cfg = {"timm_model_name": vision_json["architecture"], "timm_model_pretrained": False, "timm_pool": "avg",
                  "timm_proj": "linear", "image_size": spec.image_size}
    text_cfg = {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir), "hf_model_pretrained": False,
                "hf_proj_type": "linear", "hf_pooler_type": pooler, "context_length": spec.tokens}
    model = CustomTextCLIP(spec.embed_dim, vision_cfg, text_cfg)
    weights = {k: v for k, v in load_file(str(vision_dir / "model.safetensors")).items()
               if not k.startswith("classifier.")}  # the trunk's classifier is reset to an identity
    model.visual.trunk.load_state_dict(weights, strict=True)
    model.text.transformer.load_state_dict(load_file(str(text_dir / "model.safetensors")), strict=True)
    notes = set_open_clip_trainable(model, trainable)
    return model, notes


def set_open_clip_trainable(model: torch.nn.Module, trainable: str) -> dict[str, Any]:
    """Apply one of open_clip's trainable sets with its own flags; say what had to be done by hand."""
    bn_types = (torch.nn.BatchNorm2d,)
    notes: dict[str, Any] = {"hand_patched": []}
    if trainable in ("lock-image", "text-ln", "heads", "layernorm"):
        # Not freeze_bn_stats=True: open_clip's freeze_batch_norm_2d swaps timm's BatchNormAct2d for a plain
        # FrozenBatchNorm2d and so drops the activation fused into it (EfficientNet's ReLU6): another network.
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if trainable == "layernorm":
        # No flag trains the vision BatchNorm affine terms alone: lock the trunk, then unfreeze them by hand.
        for module in model.visual.trunk.modules():
            if isinstance(module, bn_types) and module.affine:
                module.weight.requires_grad_(True)
                module.bias.requires_grad_(True)
        notes["hand_patched"].append("vision BatchNorm weight/bias set trainable by hand (no open_clip flag)")
    if trainable in ("text-ln", "layernorm"):
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=False)  # LayerNorm affine terms stay trainable
    elif trainable == "heads":
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    elif trainable not in ("full", "lock-image"):
        raise ValueError(f"unknown open_clip trainable set {trainable!r}")
    # lilt keeps BatchNorm statistics frozen (VisionConfig.freeze_bn_stats); open_clip's only way is the swap above.
    notes["bn_eval"] = [m for m in model.visual.trunk.modules() if isinstance(m, bn_types)]
    notes["hand_patched"].append("vision BatchNorm layers kept in eval mode while training (frozen statistics, as "
                                 "lilt; lock_image_tower(freeze_bn_stats=True) would replace timm's BatchNormAct2d "
                                 "by FrozenBatchNorm2d and drop its activation)")
    return notes


def open_clip_train_mode(model: torch.nn.Module, notes: dict[str, Any]) -> None:
    """model.train(), with the BatchNorm layers whose statistics stay frozen back in eval mode."""
    model.train()
    for module in notes.get("bn_eval", []):
        module.eval()


def open_clip_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped as open_clip_train does (no decay on gains, biases, scale)."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                             lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def open_clip_step_parts(spec: Spec) -> tuple[torch.nn.Module, Callable, Callable, torch.optim.Optimizer]:
    """open_clip through its own model, lock flags, ClipLoss and an AdamW over its trainable parameters."""
    from open_clip.loss import ClipLoss

    model, notes = open_clip_model(spec, CONFIGS[spec.config][1])
    model.to(spec.device)
    open_clip_train_mode(model, notes)
    loss_fn = ClipLoss()

    def forward(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image_features, text_features, scale = model(images, ids)[:3]
        return loss_fn(image_features, text_features, scale)

    def encode(images: torch.Tensor, ids: torch.Tensor) -> Any:
        return model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)

    model.speed_notes = notes["hand_patched"]
    return model, forward, encode, open_clip_optimizer(model)


# -- measurements --------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory(device: str) -> dict[str, float]:
    """Peak resident memory of this process (MiB), and the CUDA peak allocation when on a GPU."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def synthetic_batch(spec: Spec, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and fixed token ids (no padding: every builder sees all `tokens` tokens)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, generator=generator)
    low = max(pad, 4) + 1  # above the special ids, so open_clip's pad-derived mask keeps every token
    ids = torch.randint(low, min(vocab, 30000), (spec.batch_size, spec.tokens), generator=generator)
    return images.to(spec.device), ids.to(spec.device)


def _time_steps(spec: Spec, forward: Callable, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                ids: torch.Tensor, times: dict[str, list[float]]) -> None:
    """Run `warmup` + `steps` training steps, appending the timed ones' forward / backward / optimizer seconds."""
    for step in range(spec.warmup + spec.steps):
        _sync(spec.device)
        t0 = time.perf_counter()
        loss = forward(images, ids)
        _sync(spec.device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(spec.device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(spec.device)
        t3 = time.perf_counter()
        if step >= spec.warmup:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(value)


def _time_nograd(spec: Spec, encode: Callable, images: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Seconds of each timed no-grad forward of both towers (after `warmup` untimed ones)."""
    nograd = []
    with torch.no_grad():
        for step in range(spec.warmup + spec.steps):
            _sync(spec.device)
            t0 = time.perf_counter()
            encode(images, ids)
            _sync(spec.device)
            if step >= spec.warmup:
                nograd.append(time.perf_counter() - t0)
    return nograd


def measure_steps(spec: Spec) -> dict[str, Any]:
    """Time `warmup` + `steps` training steps split into forward+loss / backward / optimizer, then no-grad forwards."""
    parts = lilt_step_parts if spec.builder == "lilt" else open_clip_step_parts
    model, forward, encode, optimizer = parts(spec)
    text_model = model.text.backbone if spec.builder == "lilt" else model.text.transformer
    config = text_model.config
    images, ids = synthetic_batch(spec, config.vocab_size, config.pad_token_id or 0)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    # lilt's rows run as lilt.train runs them: on a CPU it keeps freed memory for reuse (train.reuse_cpu_memory,
    # lilt/cpu_memory.py); open_clip's training script does not, though the same malloc settings would help it.
    with frozen_weights_in(model, torch.bfloat16, enabled=spec.config in LOW_FROZEN), \
            reuse_freed_memory(spec.builder == "lilt" and spec.device == "cpu"):
        _time_steps(spec, forward, optimizer, images, ids, times)
    model.eval()  # the fp32 weights are back, as after lilt.train
    nograd = _time_nograd(spec, encode, images, ids)
    step_times = [sum(x) for x in zip(*times.values())]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"samples_per_s": spec.batch_size / statistics.median(step_times),
            "split_s": {k: statistics.median(v) for k, v in times.items()},
            "nograd_samples_per_s": spec.batch_size / statistics.median(nograd),
            "trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
            "notes": getattr(model, "speed_notes", []), "rss_after_build_mib": rss_built, **memory(spec.device)}


def measure_e2e(spec: Spec) -> dict[str, Any]:
    """Samples/s of `epochs` epochs over the saved pairs, data loading (and lilt's cache fill) included."""
    builder, plan, cache = E2E[spec.config]
    steps = spec.epochs * (spec.pairs // spec.batch_size)
    with tempfile.TemporaryDirectory(prefix="lilt-speed-") as tmp:
        if builder == "lilt":
            model = lilt_model(spec, plan())
            config = TrainConfig.from_dict({
                "steps": steps, "batch_size": spec.batch_size, "warmup_steps": 0, "report_to": [], "save_every": 0,
                "eval_every": 0, "log_every": steps, "resume": "never", "cache": cache,
                "cache_dir": str(Path(tmp) / "cache"), "output_dir": str(Path(tmp) / "out")})
            data = DataConfig.from_dict({"source": spec.data, "augment": "crop-flip", "num_workers": spec.num_workers})
            start = time.perf_counter()
            train(model, None, config, data_config=data)
            wall = time.perf_counter() - start
            cached = sorted(p.name for p in (Path(tmp) / "cache").glob("*.safetensors"))
            extra: dict[str, Any] = {"cache_files": cached}
            if cache == "auto" and not cached:
                raise SystemExit(f"speed.py: {spec.config} trained without its feature cache (see the log above).")
        else:
            wall, extra = open_clip_e2e(spec, steps)
    if builder == "lilt":
        extra["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"samples_per_s": steps * spec.batch_size / wall, "wall_s": wall, "steps": steps,
            **extra, **memory(spec.device)}


def open_clip_e2e(spec: Spec, steps: int) -> tuple[float, dict[str, Any]]:
    """open_clip heads-only over a plain DataLoader of the same pairs, transform and (prefixed) captions."""
    import datasets
    import timm
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import HFTokenizer

    model, notes = open_clip_model(spec, "heads")
    model.to(spec.device)
    text_dir, _, prefix = text_conventions(spec.text)
    tokenizer = HFTokenizer(str(text_dir), context_length=spec.tokens)
    data_config = timm.data.resolve_data_config({}, model=model.visual.trunk)
    data_config["input_size"] = (3, spec.image_size, spec.image_size)
    transform = image_transform(data_config, "crop-flip", train=True)
    table = datasets.load_from_disk(spec.data)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(table)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
            row = table[i]
            return transform(decode_image(row["image"])), prefix + row["text"]

    def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([i for i, _ in items]), tokenizer([t for _, t in items])

    optimizer, loss_fn = open_clip_optimizer(model), ClipLoss()
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=spec.batch_size, shuffle=True, drop_last=True,
                                         num_workers=spec.num_workers, collate_fn=collate,
                                         persistent_workers=spec.num_workers > 0)
    done = 0
    open_clip_train_mode(model, notes)
    while done < steps:
        for images, ids in loader:
            image_features, text_features, scale = model(images.to(spec.device), ids.to(spec.device))[:3]
            loss = loss_fn(image_features, text_features, scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    _sync(spec.device)
    wall = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return wall, {"trainable": trainable, "notes": notes["hand_patched"]}


def run_child(raw: str) -> dict[str, Any]:
    """Measure one spec (JSON) in this process."""
    spec = Spec(**json.loads(raw))
    torch.set_num_threads(spec.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    result = measure_e2e(spec) if spec.config in E2E else measure_steps(spec)
    return {**dataclasses.asdict(spec), **result}
