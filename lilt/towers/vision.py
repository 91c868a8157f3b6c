"""VisionTower: any timm model as stem -> blocks -> pooled features."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import timm
import torch
from torch import nn

from ..config import VisionConfig
from ..errors import ConfigError, did_you_mean
from ..lean import make_lean
from .base import LAYOUTS, Tower, weights_sha256
from .packaged import is_packaged, packaged_path

# Module names after the blocks, per family: they finish features and pool them.
_FINISH = {
    "vit": ("norm", "fc_norm", "attn_pool", "head", "head_drop"),
    "efficientnet": ("conv_head", "bn2", "norm_head", "global_pool", "classifier"),
    "resnet": ("global_pool", "fc"),
    "convnext": ("norm_pre", "head"),
    "swin": ("norm", "head"),
}
# Where each family's blocks are: one container of blocks (ViT) or of stages (the rest), or ResNet's layerN.
_BLOCKS = {"vit": "blocks", "efficientnet": "blocks", "convnext": "stages", "swin": "layers"}


def _family(backbone: nn.Module) -> str:
    """Which backbone family a timm model is (by class; subclasses count), or 'generic'."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    families = {"vit": VisionTransformer, "efficientnet": (EfficientNet, MobileNetV3), "resnet": ResNet,
                "convnext": ConvNeXt, "swin": SwinTransformer}
    return next((name for name, cls in families.items() if isinstance(backbone, cls)), "generic")


def _block_paths(backbone: nn.Module, family: str) -> list[str]:
    """Module paths of the blocks (ViT blocks or CNN/Swin stages) inside the backbone."""
    if family == "resnet":
        return [f"layer{i}" for i in range(1, 5) if isinstance(getattr(backbone, f"layer{i}", None), nn.Module)]
    attr = _BLOCKS.get(family) or next((a for a in ("blocks", "stages", "layers") if isinstance(
        getattr(backbone, a, None), (nn.Sequential, nn.ModuleList))), "")
    container = getattr(backbone, attr, None) if attr else None
    return [f"{attr}.{i}" for i in range(len(container))] if container is not None else []


def _local_dir(name: str) -> Path | None:
    """The directory a vision name points at, if it is a local one."""
    raw = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    path = Path(raw).expanduser()
    if name.startswith("local-dir:") or path.is_dir():
        if not path.is_dir():
            raise ConfigError(f"vision backbone directory {raw!r} does not exist.")
        if not (path / "config.json").is_file():
            raise ConfigError(f"vision backbone directory {raw!r} has no config.json (timm layout: "
                              "config.json + model.safetensors, as written by timm.models.save_for_hf).")
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"vision backbone directory {raw!r} has no model.safetensors; lilt loads "
                              "only safetensors (never a pickle). Convert it with safetensors.torch.save_file.")
        return path
    return None


def vision_folder(config: VisionConfig) -> Path | None:
    """The local folder the backbone loads from (packaged or a directory), or None for a timm/hub name."""
    if is_packaged(config.name):
        return packaged_path(config.name)
    return _local_dir(config.name)


def vision_weights_sha256(config: VisionConfig) -> str | None:
    """sha256 of the weights the config's backbone folder holds (None when it is not a folder)."""
    return weights_sha256(vision_folder(config))


def create_vision_backbone(config: VisionConfig) -> nn.Module:
    """Create the timm model a VisionConfig names, without its classifier."""
    name = config.name
    if is_packaged(name):
        name = "local-dir:" + str(packaged_path(name))
    elif (local := _local_dir(name)) is not None:
        name = "local-dir:" + str(local)
    elif name.split(":")[0] not in ("hf-hub",) and not timm.is_model(name):
        raise ConfigError(f"unknown vision backbone {config.name!r}: not a timm model name, a directory, "
                          "or 'packaged:NAME'." + did_you_mean(name, timm.list_models()))
    kwargs: dict[str, Any] = {"num_classes": 0, **config.model_kwargs}
    try:
        if config.image_size is not None:
            try:  # transformers need the size at build time (position embeddings); CNNs take any size
                return timm.create_model(name, pretrained=config.pretrained, img_size=config.image_size, **kwargs)
            except TypeError:
                pass
        return timm.create_model(name, pretrained=config.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as err:
        if config.pretrained and not name.startswith("local-dir:"):
            raise ConfigError(
                f"could not load pretrained vision backbone {config.name!r} ({err}). Without a model hub, use "
                "'packaged:efficientnet-lite0' or a local directory in timm layout.") from err
        raise ConfigError(f"could not build vision backbone {config.name!r} with model_kwargs "
                          f"{config.model_kwargs} and image_size {config.image_size} ({type(err).__name__}: "
                          f"{err}).") from err


class VisionTower(Tower):
    """A timm image model: patch/conv stem, blocks (ViT blocks or CNN stages), pooled features."""

    kind = "vision"

    def __init__(self, backbone: nn.Module, config: VisionConfig) -> None:
        super().__init__(backbone, config.name)
        self.config = config
        self.family = _family(backbone)
        self.freeze_bn_stats = config.freeze_bn_stats
        self.hidden_size = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.can_split = self.family != "generic"
        self._block_paths = _block_paths(backbone, self.family)
        self._blocks_attr = self._block_paths[0].split(".")[0] if self._block_paths else ""
        if self.family == "vit":
            first = self.backbone_blocks()[0] if self.backbone_blocks() else None
            is_prenorm = all(hasattr(first, a) for a in ("norm1", "attn", "norm2", "mlp"))
            self.layout = LAYOUTS["vit"] if is_prenorm else None
        elif self.family != "generic":
            self.layout = LAYOUTS[self.family]
        # Stage output widths as timm records them (ResNet, ConvNeXt, Swin stages are feature_info modules).
        self._stage_channels = {info["module"]: int(info["num_chs"]) for info in getattr(backbone, "feature_info", [])
                                if isinstance(info, dict) and "module" in info}
        if config.mask_ratio:
            self._set_patch_dropout(config.mask_ratio)
        self.channels_last = config.channels_last and self.family == "efficientnet"
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if config.lean_backward:
            make_lean(self.backbone)
        data_config = timm.data.resolve_data_config({}, model=backbone)
        if config.image_size is not None:
            data_config["input_size"] = (3, config.image_size, config.image_size)
        self.data_config = data_config

    def _set_patch_dropout(self, ratio: float) -> None:
        """FLIP: drop this share of patch tokens at random in train mode (timm's PatchDropout; eval keeps all)."""
        if self.family != "vit":
            raise ConfigError(f"VisionConfig.mask_ratio={ratio} drops ViT patch tokens (FLIP), but {self.source!r} is "
                              f"not a ViT ({self.family} tower); set model.vision.mask_ratio=0 or use a ViT.")
        from timm.layers import PatchDropout

        # Set on the timm model itself, where its own forward (and lilt's embed) already calls it; the prefix
        # tokens (class, registers) are always kept. It has no tensors: backbone hashes do not change.
        b = self.backbone
        b.patch_drop = PatchDropout(ratio, num_prefix_tokens=b.num_prefix_tokens)

    @classmethod
    def from_config(cls, config: VisionConfig) -> "VisionTower":
        """Load the backbone a VisionConfig names."""
        tower = cls(create_vision_backbone(config), config)
        tower.weights_sha256 = vision_weights_sha256(config)
        return tower

    def image_transform(self, train: bool = False) -> Any:
        """timm's preprocessing for this backbone (eval: resize + center crop)."""
        return timm.data.create_transform(**self.data_config, is_training=train)

    def backbone_blocks(self) -> Sequence[nn.Module]:
        return [self.backbone.get_submodule(path) for path in self._block_paths]

    def block_names(self) -> list[str]:
        extra = [f"extra_blocks.{i}" for i in range(len(self.extra_blocks))]
        return [f"backbone.{p}" for p in self._block_paths] + extra

    def backbone_block_prefix(self) -> str:
        return self._blocks_attr

    def stem_parameters(self) -> Iterable[nn.Parameter]:
        skip = {*(p.split(".")[0] for p in self._block_paths), *_FINISH.get(self.family, ())}
        return (p for n, p in self.backbone.named_parameters() if n.split(".")[0] not in skip)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        b = self.backbone
        if self.family == "vit":
            x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(images))))
        elif self.family == "efficientnet":
            x = b.bn1(b.conv_stem(images))
        elif self.family == "resnet":
            x = b.maxpool(b.act1(b.bn1(b.conv1(images))))
        elif self.family == "convnext":
            x = b.stem(images)
        elif self.family == "swin":  # tokens stay (B, H, W, C) between stages
            x = b.patch_embed(images)
        else:  # the whole backbone is the "stem"; only appended blocks run separately
            x = b.forward_features(images)
        return x, None

    def finish(self, hidden: torch.Tensor, context: None) -> torch.Tensor:
        b = self.backbone
        if self.family in ("vit", "swin"):
            hidden = b.norm(hidden)
        elif self.family == "convnext":
            hidden = b.norm_pre(hidden)
        elif self.family == "efficientnet" and hasattr(b, "bn2"):  # MobileNetV3 has its head conv in forward_head
            hidden = b.bn2(b.conv_head(hidden))
        return b.forward_head(hidden, pre_logits=True)

    def stage_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features, then every block's output averaged over positions: a multi-scale view.

        What the frozen-feature ridge map reads with `eval.ridge_features: stages`: earlier stages keep
        shape and stroke cues that the last one (tuned to ImageNet's classes) has pooled away (on
        builtin:emoji-cldr's unseen emoji the ridge map's English R@1 goes from 22.4 / 21.7 to 23.0 / 25.2,
        validation from 40.2 to 41.4; benchmarks/claims.py, ridge-stages).
        Width: hidden_size plus the sum of block_channels; a backbone lilt cannot split gives the pooled ones.
        """
        if not self.can_split:
            return self(images)
        hidden, context = self.embed(images)
        pooled = []
        for block in self._runnable_blocks():
            hidden = self.run_block(block, hidden, context)
            # CNN stages are (B, C, H, W), Swin's (B, H, W, C), a ViT's tokens (B, N, C).
            dims = (1, 2) if self.family == "swin" else (2, 3) if hidden.dim() == 4 else (1,)
            pooled.append(hidden.float().mean(dims))
        return torch.cat([self.finish(hidden, context).float(), *pooled], -1)

    def block_channels(self, index: int) -> int:
        """Output width of block `index` (tokens: embedding size; CNN/Swin stages: channels)."""
        if self.family == "vit":
            return int(self.backbone.embed_dim)
        paths = self._block_paths
        if self.family in ("resnet", "convnext", "swin") and paths:
            # Appended and inserted blocks keep the width of the stage they follow.
            path = paths[min(index, len(paths) - 1)]
            if path in self._stage_channels:
                return self._stage_channels[path]
        block = self.blocks()[index]
        norms = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
        if not norms:
            raise ConfigError(f"cannot tell the output channels of vision block {index} ({type(block).__name__}).")
        last = norms[-1]
        return int(last.num_features if isinstance(last, nn.BatchNorm2d) else last.num_channels)
