"""Tiny random-init backbones built in-process and saved as local directories (no hub, no download)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a an the cat dog red blue car photo of small big bird fish tree house on in with and is "
         "green sky water man woman child ball runs sits").split()


def save_tiny_vit(path: Path) -> Path:
    """A 2-block timm ViT (32 px, patch 8, width 32)."""
    import timm

    args = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    _randomize_norms(model)
    timm.models.save_for_hf(model, str(path), model_args=args, safe_serialization=True)
    return path


def save_tiny_cnn(path: Path) -> Path:
    """timm's 5-stage test EfficientNet (about 0.1 M parameters), with non-trivial BatchNorm statistics."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    _randomize_norms(model)
    timm.models.save_for_hf(model, str(path), safe_serialization=True)
    return path


def save_tiny_bert(path: Path, hidden_size: int = 32, seed: int = 2) -> Path:
    """A 2-layer BERT (width 32 by default) with a word-level WordPiece tokenizer over a small vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=False)
    _randomize_norms(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _randomize_norms(model: torch.nn.Module) -> None:
    # Fresh norms are exactly (1, 0) and BN stats (0, 1): a bug that resets them would go unseen.
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and "Norm" in type(module).__name__:
                noise = 0.1 * torch.randn(tensor.shape, generator=generator)
                tensor.data.add_(noise.abs() if name == "running_var" else noise)
