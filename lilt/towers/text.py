"""TextTower: any transformers encoder as embeddings -> layers -> pooled caption vector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..config import TextConfig
from ..errors import ConfigError
from ..lean import make_lean
from .base import LAYOUTS, Tower, weights_sha256
from .packaged import is_packaged, packaged_info, packaged_path

DEFAULT_MAX_LENGTH = 32  # LilT trains on captions of about 30 tokens


@dataclass
class TextContext:
    """What every layer needs besides the hidden states."""

    attention_mask: torch.Tensor  # (batch, tokens), 1 for real tokens
    layer_mask: Any = None        # the backbone's own mask format for its layers
    position_bias: Any = None     # relative-position bias every layer adds (MPNet, T5)


# Families whose layers lilt runs one by one: (family, layer list, a path inside a layer that identifies it,
# paths in the backbone that must be absent). Checked in order; anything else is "generic".
_TEXT_FAMILIES = (
    # BERT, RoBERTa, XLM-R; not DeBERTa (relative embeddings) nor ELECTRA with a projection after the embeddings.
    ("bert", "encoder.layer", "attention.output.LayerNorm", ("encoder.rel_embeddings", "embeddings_project")),
    ("mpnet", "encoder.layer", "attention.attn.o", ()),
    ("distilbert", "transformer.layer", "sa_layer_norm", ()),
    ("t5", "encoder.block", "layer.1.layer_norm", ("decoder",)),  # the encoder alone (T5EncoderModel, mT5)
)
# Pooling when neither the config nor the backbone's folder says: T5 has no [CLS] token, so it averages.
_DEFAULT_POOLING = {"t5": "mean"}


def _resolve_source(config: TextConfig) -> tuple[str, dict[str, Any]]:
    """Where to load from, and the backbone's conventions (pooling, prefix, max_length)."""
    if is_packaged(config.name):
        info = packaged_info(config.name)
        if info.kind != "text":
            raise ConfigError(f"{config.name!r} is a {info.kind} backbone; TextConfig.name needs a text one.")
        conventions = {"pooling": info.pooling or "cls", "prefix": info.text_prefix, "max_length": info.max_length}
        return str(packaged_path(config.name)), conventions
    conventions: dict[str, Any] = {"pooling": None, "prefix": "", "max_length": None}
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
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        # An encoder-decoder (T5, mT5) contributes its encoder only: AutoModel would build the decoder too.
        encoder_only = getattr(config, "is_encoder_decoder", False) or any(
            a.endswith("EncoderModel") for a in getattr(config, "architectures", None) or [])
        auto = AutoModelForTextEncoding if encoder_only else AutoModel
        try:  # the pooler is never used (lilt pools itself); not building it keeps the budget honest
            model = auto.from_pretrained(source, add_pooling_layer=False, **safe)
        except TypeError:
            model = auto.from_pretrained(source, **safe)
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
        self.hidden_size = int(getattr(backbone.config, "hidden_size", None) or backbone.config.d_model)
        self.family, self._layers_path = self._find_family()
        if config.lean_backward:
            make_lean(self.backbone)
        # Known families expose embeddings and layers, so the prefix can run apart and be cached.
        self.can_split = self.family != "generic"
        self.layout = LAYOUTS.get(self.family)
        pooling = conventions.get("pooling") or _DEFAULT_POOLING.get(self.family, "cls")
        self.pooling = config.pooling if config.pooling != "auto" else pooling
        self.prefix = config.prefix if config.prefix is not None else conventions.get("prefix", "")
        self.max_length = config.max_length or conventions.get("max_length") or DEFAULT_MAX_LENGTH

    @classmethod
    def from_config(cls, config: TextConfig) -> "TextTower":
        """Load the backbone and tokenizer a TextConfig names."""
        source, conventions = _resolve_source(config)
        backbone, tokenizer = load_text_backbone(source, config.model_kwargs)
        tower = cls(backbone, tokenizer, config, conventions)
        tower.weights_sha256 = weights_sha256(Path(source)) if Path(source).is_dir() else None
        return tower

    def _find_family(self) -> tuple[str, str]:
        """(family, module path of the layer list); ('generic', path or '') when lilt cannot run layers apart."""
        for family, layers, probe, absent in _TEXT_FAMILIES:
            found = _get_path(self.backbone, layers)
            if isinstance(found, nn.ModuleList) and len(found) and _get_path(found[0], probe) is not None \
                    and all(_get_path(self.backbone, path) is None for path in absent):
                return family, layers
        for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers", "encoder.block"):
            if isinstance(_get_path(self.backbone, path), nn.ModuleList):
                return "generic", path
        return "generic", ""

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
        b = self.backbone
        if self.family == "t5":  # the relative-position table of the first layer serves every layer
            return [*b.encoder.embed_tokens.parameters(),
                    *b.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.parameters()]
        if self.family == "mpnet":
            return [*b.embeddings.parameters(), *b.encoder.relative_attention_bias.parameters()]
        return b.embeddings.parameters()

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, TextContext]:
        attention_mask = inputs["attention_mask"]
        if not self.can_split:  # the whole backbone is the "stem"; only appended blocks run apart
            hidden = self.backbone(**inputs).last_hidden_state
            return hidden, TextContext(attention_mask)
        b, ids = self.backbone, inputs["input_ids"]
        if self.family == "t5":  # what T5Stack.forward does before its blocks
            hidden = b.encoder.dropout(b.encoder.embed_tokens(ids))
        elif self.family == "bert":
            extra = {"token_type_ids": inputs["token_type_ids"]} if "token_type_ids" in inputs else {}
            hidden = b.embeddings(input_ids=ids, **extra)
        else:
            hidden = b.embeddings(input_ids=ids)
        return hidden, self.context_for(hidden, attention_mask)

    def context_for(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> TextContext:
        """What the layers need besides `hidden`, rebuilt from the attention mask (as embed() builds it; the
        feature cache keeps hidden states after a frozen prefix and their masks, not the context)."""
        if not self.can_split:
            return TextContext(attention_mask)
        from transformers.masking_utils import create_bidirectional_mask

        b, position_bias = self.backbone, None
        if self.family == "t5":  # what T5Stack.forward does before its blocks
            attention = b.encoder.block[0].layer[0].SelfAttention
            position_bias = attention.compute_bias(hidden.shape[1], hidden.shape[1], device=hidden.device)
        elif self.family == "mpnet":
            position_bias = b.encoder.compute_position_bias(hidden)
        layer_mask = create_bidirectional_mask(config=b.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return TextContext(attention_mask, layer_mask, position_bias)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: TextContext) -> torch.Tensor:
        if context.position_bias is not None:
            out = block(hidden, context.layer_mask, position_bias=context.position_bias)
        else:
            out = block(hidden, context.layer_mask)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden: torch.Tensor, context: TextContext) -> torch.Tensor:
        if self.family == "t5":
            hidden = self.backbone.encoder.dropout(self.backbone.encoder.final_layer_norm(hidden))
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = context.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _get_path(module: nn.Module, path: str) -> Any:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
