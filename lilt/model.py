"""DualEncoder: two towers, two linear heads and a learnable temperature; trainable-only checkpoints."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import DEFAULT_TEXT, DEFAULT_VISION, ConfigError, ModelConfig, TextConfig, VisionConfig
from .plan import PlanState, TuningPlan, apply_plan
from .towers.packaged import sha256_file
from .towers.text import TextTower
from .towers.vision import VisionTower

CONFIG_NAME = "lilt_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "lilt-dual-encoder"
FORMAT_VERSION = 1


class BackboneMismatchError(ValueError):
    """A checkpoint is loaded onto backbone weights other than the ones it was trained on."""


@dataclass
class DualEncoderOutput:
    """Normalized embeddings of a batch of pairs, and the (clamped) logit scale and bias."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None

    def logits_per_image(self) -> torch.Tensor:
        """Scaled image-text similarities, images as rows."""
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.t()
        return logits + self.logit_bias if self.logit_bias is not None else logits


class DualEncoder(nn.Module):
    """A CLIP-style dual encoder over a frozen timm vision model and a frozen transformers text model."""

    def __init__(self, config: ModelConfig | None = None, *, vision: VisionTower | None = None,
                 text: TextTower | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        self.vision = vision if vision is not None else VisionTower.from_config(config.vision)
        self.text = text if text is not None else TextTower.from_config(config.text)
        self.vision_proj = nn.Linear(self.vision.hidden_size, config.embed_dim, bias=config.head_bias)
        self.text_proj = nn.Linear(self.text.hidden_size, config.embed_dim, bias=config.head_bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.logit_bias = None if config.logit_bias is None else nn.Parameter(torch.tensor(float(config.logit_bias)))
        self.plan_state: PlanState | None = None
        # Growth (lilt.growth): a shared encoder on top of both towers, and the ops applied, in order.
        self.shared_encoder: nn.Module | None = None
        self.growth: list[dict[str, Any]] = []

    @classmethod
    def from_backbones(cls, vision: str = DEFAULT_VISION, text: str = DEFAULT_TEXT, *, embed_dim: int = 256,
                       vision_options: Mapping[str, Any] | None = None,
                       text_options: Mapping[str, Any] | None = None, **options: Any) -> "DualEncoder":
        """Build from backbone names ('packaged:...', a directory, a timm/hub name) and ModelConfig options."""
        config = ModelConfig(
            vision=VisionConfig.from_dict({"name": vision, **(vision_options or {})}, where="vision_options"),
            text=TextConfig.from_dict({"name": text, **(text_options or {})}, where="text_options"),
            embed_dim=embed_dim, **options)
        return cls(config)

    # -- encoding ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the heads live."""
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so the temperature stays in [min_temperature, max_temperature]."""
        lo, hi = math.log(1.0 / self.config.max_temperature), math.log(1.0 / self.config.min_temperature)
        return self.logit_scale.clamp(lo, hi).exp()

    def tokenize(self, texts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """The text tower's tokenization (prefix, truncation, padding)."""
        return self.text.tokenize(texts)

    def image_transform(self, train: bool = False) -> Any:
        """The vision tower's preprocessing (PIL image -> tensor)."""
        return self.vision.image_transform(train)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed a batch of preprocessed images (B, 3, H, W)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"encode_image expects a (batch, 3, height, width) tensor; got shape "
                             f"{tuple(pixel_values.shape)}. Preprocess PIL images with model.image_transform().")
        embeds = self.vision_proj(self.image_features(pixel_values))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the vision head sees: pooled tower features, through the shared encoder when grown."""
        features = self.vision(pixel_values.to(self.device))
        return self.shared_encoder(features, "vision") if self.shared_encoder is not None else features

    def text_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the text head sees: pooled tower features of a tokenized batch, through the shared encoder."""
        features = self.text({k: v.to(self.device) for k, v in batch.items()})
        return self.shared_encoder(features, "text") if self.shared_encoder is not None else features

    def encode_text(self, text: Sequence[str] | str | Mapping[str, torch.Tensor],
                    normalize: bool = True) -> torch.Tensor:
        """Embed captions (strings, or a tokenized batch with input_ids and attention_mask)."""
        batch = self.tokenize(text) if isinstance(text, (str, list, tuple)) else dict(text)
        missing = {"input_ids", "attention_mask"} - set(batch)
        if missing:
            raise ValueError(f"encode_text needs {sorted(missing)} in the tokenized batch; got {sorted(batch)}.")
        embeds = self.text_proj(self.text_features(batch))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **text_inputs: torch.Tensor) -> DualEncoderOutput:
        """Embed a batch of image-text pairs."""
        text = {"input_ids": input_ids, "attention_mask": attention_mask, **text_inputs}
        return DualEncoderOutput(self.encode_image(pixel_values), self.encode_text(text), self.scale(),
                                 self.logit_bias)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Normalized embeddings of PIL images, in batches, without gradients."""
        transform = self.image_transform()
        chunks = []
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="images"):
            batch = torch.stack([transform(img.convert("RGB")) for img in images[start:start + batch_size]])
            chunks.append(self.encode_image(batch))
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.embed_dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Normalized embeddings of captions, in batches, without gradients."""
        chunks = [self.encode_text(list(texts[s:s + batch_size]))
                  for s in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="texts")]
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.embed_dim)

    # -- checkpoints -------------------------------------------------------------------------------
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trainable parameters and every tensor a plan added."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        trainable |= self.plan_state.tuned if self.plan_state is not None else set()
        bn_stats_train = not self.config.vision.freeze_bn_stats
        out = {}
        for key, tensor in self.state_dict().items():
            tower_name, _, rel = key.partition(".")
            tower = getattr(self, tower_name) if tower_name in ("vision", "text") else None
            frozen_pretrained = tower is not None and tower.is_pristine_key(rel) and key not in trainable
            if frozen_pretrained and not (bn_stats_train and tower_name == "vision" and _is_bn_stat(key)):
                continue
            out[key] = tensor
        return out

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model.safetensors (trainable/added tensors only) and lilt_config.json, each atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.delta_state_dict().items()}
        tmp = path / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "lilt_format": str(FORMAT_VERSION)})
        _fsync(tmp)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lilt_version": __version__,
            "model": self.config.to_dict(),
            "plan": self.plan_state.plan.to_dict() if self.plan_state else None,
            "growth": self.growth,
            "backbones": {name: {"name": tower.source, "sha256": tower.backbone_sha256}
                          for name, tower in (("vision", self.vision), ("text", self.text))},
            "text_conventions": {"pooling": self.text.pooling, "prefix": self.text.prefix,
                                 "max_length": self.text.max_length},
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(tmp), "tensors": len(tensors),
                        "bytes": tmp.stat().st_size},
        }
        # Weights first, config last: the config names the weights' hash, so a save cut off between
        # the two is detected at load time instead of silently pairing old config and new weights.
        os.replace(tmp, path / WEIGHTS_NAME)
        config_tmp = path / f".{CONFIG_NAME}.{os.getpid()}.tmp"
        config_tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _fsync(config_tmp)
        os.replace(config_tmp, path / CONFIG_NAME)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vision: str | None = None, text: str | None = None,
                        check_backbones: bool = True) -> "DualEncoder":
        """Rebuild backbones, re-apply the plan and load the trained tensors (strict key check).

        `vision`/`text` point at moved backbones; `check_backbones=False` accepts backbone weights
        whose hash differs from the ones the checkpoint was trained on.
        """
        path = Path(path)
        manifest = read_manifest(path)
        model_dict = manifest["model"]
        if vision is not None:
            model_dict["vision"]["name"] = vision
        if text is not None:
            model_dict["text"]["name"] = text
        model = cls(ModelConfig.from_dict(model_dict, where=f"{path / CONFIG_NAME}:model"))
        for name in ("vision", "text"):
            expected = manifest["backbones"][name]["sha256"]
            actual = getattr(model, name).backbone_sha256
            if actual != expected and check_backbones:
                raise BackboneMismatchError(
                    f"the {name} backbone {getattr(model, name).source!r} has weights sha256 {actual[:16]}..., but "
                    f"{path} was trained on {manifest['backbones'][name]['name']!r} with sha256 {expected[:16]}.... "
                    "Point at the right backbone, or pass check_backbones=False to load anyway.")
        if manifest["plan"] is not None:
            apply_plan(model, TuningPlan.from_dict(manifest["plan"], where=f"{path / CONFIG_NAME}:plan"))
        if manifest.get("growth"):  # rebuild the grown architecture; the saved tensors then fill it
            from .growth import replay_growth
            replay_growth(model, manifest["growth"])
        model.load_delta(path / WEIGHTS_NAME, manifest["weights"]["sha256"])
        return model

    def load_delta(self, file: Path, sha256: str | None = None) -> None:
        """Load a trainable-only safetensors file, refusing missing or unexpected tensors."""
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete.")
        if sha256 is not None and sha256_file(file) != sha256:
            raise ConfigError(f"{file} does not match the sha256 recorded in {CONFIG_NAME} (a save was interrupted, "
                              "or the file was changed). Save the checkpoint again.")
        tensors = load_file(str(file))
        expected = set(self.delta_state_dict())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ConfigError(f"{file} does not fit this model: missing {_first(missing)}, unexpected "
                              f"{_first(unexpected)}. Was it saved with another plan or backbone?")
        self.load_state_dict(tensors, strict=False)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint's lilt_config.json."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r}; is it a lilt checkpoint directory "
                                "(written by DualEncoder.save_pretrained)?")
    manifest = json.loads(file.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{file} is format {manifest.get('format')!r} v{manifest.get('format_version')}; this "
                          f"lilt ({__version__}) reads {FORMAT!r} up to v{FORMAT_VERSION}.")
    return manifest


def _first(names: list[str], n: int = 8) -> str:
    return str(names[:n])[:-1] + (", ...]" if len(names) > n else "]")


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _fsync(file: Path) -> None:
    with open(file, "rb+") as handle:
        os.fsync(handle.fileno())
