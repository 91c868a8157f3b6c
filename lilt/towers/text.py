"""TextTower: any transformers encoder as embeddings -> layers -> pooled caption vector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..config import TextConfig
from ..errors import ConfigError
from .base import Tower, weights_sha256
from .packaged import is_packaged, packaged_info, packaged_path

DEFAULT_MAX_LENGTH = 32  # LilT trains on captions of about 30 tokens


@dataclass
class TextContext:
    """What every layer needs besides the hidden states."""

    attention_mask: torch.Tensor  # (batch, tokens), 1 for real tokens
    layer_mask: Any = None        # the backbone's own mask format for its layers


def _resolve_source(config: TextConfig) -> tuple[str, dict[str, Any]]:
    """Where to load from, and the backbone's conventions (pooling, prefix, max_length)."""
    if is_packaged(config.name):
        info = packaged_info(config.name)
        if info.kind != "text":
            raise ConfigError(f"{config.name!r} is a {info.kind} backbone; TextConfig.name needs a text one.")
        conventions = {"pooling": info.pooling or "cls", "prefix": info.text_prefix, "max_length": info.max_length}
        return str(packaged_path(config.name)), conventions
    conventions: dict[str, Any] = {"pooling": "cls", "prefix": "", "max_length": None}
    path = Path(config.name).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"text backbone directory {config.name!r} has no *.safetensors weights; lilt loads only "
                              "safetensors (never a pickle). Re-save it with save_pretrained(safe_serialization=True).")
        pooling_file = path / "1_Pooling" / "config.json"  # sentence-transformers records its pooling here
        if pooling_file.is_file():
            pooling = json.loads(pooling_file.read_text())
            conventions["pooling"] = "mean" if pooling.get("pooling_mode_mean_tokens") else "cls"
    if "e5" in path.name.lower() or "e5" in config.name.lower().split("/")[-1]:
        conventions.update(pooling="mean", prefix="query: ")  # e5 convention: prefix + mean pooling
    return config.name, conventions


def text_weights_sha256(config: TextConfig) -> str | None:
    """sha256 of the weights the config's backbone folder holds (None for a hub id)."""
    source, _ = _resolve_source(config)
    return weights_sha256(Path(source)) if Path(source).is_dir() else None


def load_text_backbone(source: str, model_kwargs: Mapping[str, Any]) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """AutoModel (without pooler) and AutoTokenizer from a directory or hub id."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in notebooks and logs
    try:
        # Never code shipped next to the weights (auto_map + modeling_*.py), never a pickle: a backbone is data.
        safe = {**model_kwargs, "trust_remote_code": False}
        if Path(source).is_dir():
            safe["use_safetensors"] = True
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        try:  # the pooler is never used (lilt pools itself); not building it keeps the budget honest
            model = AutoModel.from_pretrained(source, add_pooling_layer=False, **safe)
        except TypeError:
            model = AutoModel.from_pretrained(source, **safe)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"could not load text backbone {source!r} with model_kwargs {dict(model_kwargs)} ({err}). Without a "
            "model hub, use "
            "'packaged:multilingual-e5-small' or a local directory written by save_pretrained.") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer


class TextTower(Tower):
    """A transformers encoder with its tokenizer, caption prefix, max length and pooling."""

    kind = "text"

    def __init__(self, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, config: TextConfig,
                 conventions: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, config.name)
        conventions = dict(conventions or {})
        self.config = config
        self.tokenizer = tokenizer
        self.pooling = config.pooling if config.pooling != "auto" else conventions.get("pooling", "cls")
        self.prefix = config.prefix if config.prefix is not None else conventions.get("prefix", "")
        self.max_length = config.max_length or conventions.get("max_length") or DEFAULT_MAX_LENGTH
        self.hidden_size = int(backbone.config.hidden_size)
        self._layers_path = self._find_layers()
        # BERT-like encoders expose embeddings and layers, so the prefix can run apart and be cached.
        self.can_split = self._layers_path == "encoder.layer" and hasattr(backbone, "embeddings")
        first = self.backbone_blocks()[0] if self.backbone_blocks() else None
        parts = ("attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm")
        is_postnorm = first is not None and all(_get_path(first, p) is not None for p in parts)
        self.block_kind = "postnorm" if is_postnorm else "generic"

    @classmethod
    def from_config(cls, config: TextConfig) -> "TextTower":
        """Load the backbone and tokenizer a TextConfig names."""
        source, conventions = _resolve_source(config)
        backbone, tokenizer = load_text_backbone(source, config.model_kwargs)
        tower = cls(backbone, tokenizer, config, conventions)
        tower.weights_sha256 = weights_sha256(Path(source)) if Path(source).is_dir() else None
        return tower

    def _find_layers(self) -> str:
        for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
            if isinstance(_get_path(self.backbone, path), nn.ModuleList):
                return path
        return ""

    def tokenize(self, texts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Prefix, tokenize, truncate to max_length and pad a batch of captions."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.tokenizer([self.prefix + t for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return dict(batch)

    def backbone_blocks(self) -> Sequence[nn.Module]:
        return list(_get_path(self.backbone, self._layers_path)) if self._layers_path else []

    def backbone_block_prefix(self) -> str:
        return self._layers_path

    def stem_parameters(self) -> Iterable[nn.Parameter]:
        return self.backbone.embeddings.parameters()

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, TextContext]:
        attention_mask = inputs["attention_mask"]
        if not self.can_split:  # the whole backbone is the "stem"; only appended blocks run apart
            hidden = self.backbone(**inputs).last_hidden_state
            return hidden, TextContext(attention_mask)
        from transformers.masking_utils import create_bidirectional_mask

        extra = {"token_type_ids": inputs["token_type_ids"]} if "token_type_ids" in inputs else {}
        hidden = self.backbone.embeddings(input_ids=inputs["input_ids"], **extra)
        layer_mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden,
                                               attention_mask=attention_mask)
        return hidden, TextContext(attention_mask, layer_mask)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: TextContext) -> torch.Tensor:
        out = block(hidden, context.layer_mask)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden: torch.Tensor, context: TextContext) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = context.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _get_path(module: nn.Module, path: str) -> Any:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
