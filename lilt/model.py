"""DualEncoder: two towers, two linear heads and a learnable temperature; trainable-only checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .config import DEFAULT_TEXT, DEFAULT_VISION, ModelConfig, TextConfig, VisionConfig
from .cpu_memory import keeps_freed_memory
from .errors import BackboneMismatchError, DataError
from .plan import PlanState
from .towers.text import TextTower
from .towers.vision import VisionTower

__all__ = ["BackboneMismatchError", "DualEncoder", "DualEncoderOutput"]


@dataclass
class DualEncoderOutput:
    """Normalized embeddings of a batch of pairs, and the (clamped) logit scale and bias."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    parallel_source: torch.Tensor | None = None  # parallel text: pivot-language embeddings (no gradient)
    parallel_target: torch.Tensor | None = None  # ... and their translations'
    ssl_a: torch.Tensor | None = None  # SLIP: the SSL head's outputs for the first and second extra views
    ssl_b: torch.Tensor | None = None

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
        self.ssl_head: nn.Sequential | None = None  # SLIP (add_ssl_head); saved and loaded with the model

    def add_ssl_head(self, sizes: Sequence[int] | None = None) -> nn.Sequential:
        """SLIP's projection head on the vision tower's pooled features (Linear-ReLU-Linear), created once.

        `sizes` = (in, hidden, out); the default is (tower width, tower width, embed_dim). The head sees only
        the extra views; retrieval never uses it. A checkpoint records its sizes, so a resume or load rebuilds it.
        """
        if self.ssl_head is None:
            width = self.vision.hidden_size
            d_in, hidden, out = sizes or (width, width, self.config.embed_dim)
            self.ssl_head = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out)).to(self.device)
        return self.ssl_head

    def ssl_head_sizes(self) -> list[int] | None:
        """(in, hidden, out) of the SLIP head, or None without one."""
        if self.ssl_head is None:
            return None
        return [self.ssl_head[0].in_features, self.ssl_head[0].out_features, self.ssl_head[2].out_features]

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

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the towers' trainable blocks in the backward pass instead of keeping their activations.

        Peak memory drops to about one block's activations plus each block's input, for one more forward pass
        of those blocks per step; gradients are the same (dropout masks are replayed).
        """
        for tower in (self.vision, self.text):
            tower.gradient_checkpointing = enabled

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
            raise DataError(f"encode_image expects a (batch, 3, height, width) tensor; got shape "
                            f"{tuple(pixel_values.shape)}. Preprocess PIL images with model.image_transform().")
        embeds = self.vision_proj(self.image_features(pixel_values))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the vision head sees: pooled tower features, through the shared encoder when grown."""
        features = self.vision(pixel_values.to(self.device))
        return self.shared_encoder(features, "vision") if self.shared_encoder is not None else features

    def image_stage_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen vision tower's multi-scale view: pooled features, then each block's pooled output."""
        return self.vision.stage_features(pixel_values.to(self.device))

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
            raise DataError(f"encode_text needs {sorted(missing)} in the tokenized batch; got {sorted(batch)}.")
        embeds = self.text_proj(self.text_features(batch))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, parallel: Mapping[str, torch.Tensor] | None = None,
                ssl_views: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                text_features: torch.Tensor | None = None, image_hidden: torch.Tensor | None = None,
                text_hidden: torch.Tensor | None = None, **text_inputs: torch.Tensor) -> DualEncoderOutput:
        """Embed a batch of image-text pairs (and of parallel text, `source_*`/`target_*` tokenized, if given;
        and SLIP's two extra views of each image, `ssl_views` (batch, 2, 3, H, W), through the SSL head).
        From a feature cache (lilt.cache), instead of pixels/tokens: `image_features`/`text_features`, the
        towers' pooled outputs, or `image_hidden`/`text_hidden` (with its `attention_mask`), the outputs of the
        towers' frozen prefixes of blocks."""
        if image_hidden is not None:
            hidden = image_hidden.to(self.device)
            if hidden.dim() == 4 and getattr(self.vision, "channels_last", False):  # the layout embed() gives
                hidden = hidden.contiguous(memory_format=torch.channels_last)
            features = self.vision.forward_suffix(hidden, None, self.vision.frozen_prefix_depth())
            image = F.normalize(self.vision_proj(features), dim=-1)
        elif image_features is not None:
            image = F.normalize(self.vision_proj(image_features.to(self.device)), dim=-1)
        else:
            image = self.encode_image(pixel_values)
        if text_hidden is not None:
            hidden, mask = text_hidden.to(self.device), attention_mask.to(self.device)
            features = self.text.forward_suffix(hidden, self.text.context_for(hidden, mask),
                                                self.text.frozen_prefix_depth())
            text = F.normalize(self.text_proj(features), dim=-1)
        elif text_features is not None:
            text = F.normalize(self.text_proj(text_features.to(self.device)), dim=-1)
        else:
            text = self.encode_text({"input_ids": input_ids, "attention_mask": attention_mask, **text_inputs})
        out = DualEncoderOutput(image, text, self.scale(), self.logit_bias)
        if ssl_views is not None:
            if self.ssl_head is None:
                raise DataError("ssl_views given, but the model has no SSL head; call model.add_ssl_head() first.")
            # Both views in one pass of the tower (first all view-1 images, then all view-2 ones).
            views = self.ssl_head(self.vision(ssl_views.transpose(0, 1).flatten(0, 1).to(self.device)))
            out.ssl_a, out.ssl_b = views.chunk(2)
        if parallel is not None:  # in the same forward, so DDP sees every gradient of the step
            with torch.no_grad():  # the pivot side is the teacher: only the target language moves
                out.parallel_source = self.encode_text(_side(parallel, "source"))
            out.parallel_target = self.encode_text(_side(parallel, "target"))
        return out

    @keeps_freed_memory
    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Normalized embeddings of PIL images, in batches, without gradients (the vision tower in eval mode)."""
        transform = self.image_transform()
        chunks = []
        # A loaded model starts in train mode (timm's default); FLIP's patch dropping must not reach inference.
        was_training = self.vision.training
        self.vision.eval()
        try:
            for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="images"):
                batch = torch.stack([transform(img.convert("RGB")) for img in images[start:start + batch_size]])
                chunks.append(self.encode_image(batch))
        finally:
            self.vision.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.embed_dim)

    @keeps_freed_memory
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

    def save_pretrained(self, path: str | Path, training: Mapping[str, Any] | None = None) -> Path:
        """Write model.safetensors (trainable/added tensors only), lilt_config.json and a README.md model card;
        the old folder survives any failure (the new one is built aside and swapped in). `training`
        (lilt.hub.training_summary) puts the run's data and final validation metrics on the card."""
        return checkpoint.write_model(self, path, training)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vision: str | None = None, text: str | None = None,
                        check_backbones: bool = True) -> "DualEncoder":
        """Rebuild backbones, re-apply the plan and growth, and load the trained tensors (strict key check).

        Every hash is checked first: the weights against the config, the config against the weights, and
        the backbones' weights against the ones the model was trained on (`check_backbones=False` accepts
        other ones). `vision`/`text` point at moved backbones. Nothing in the folder can run code.
        """
        return checkpoint.load_model(cls, path, vision=vision, text=text, check_backbones=check_backbones)

    def load_delta(self, file: str | Path) -> None:
        """Load a trainable-only safetensors file, refusing missing, unexpected or misshapen tensors."""
        checkpoint.load_delta(self, Path(file))


def _side(batch: Mapping[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """{input_ids, attention_mask, ...} of one side of a tokenized parallel batch."""
    return {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")}


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))
