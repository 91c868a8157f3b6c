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


# Tiny vision towers of the other block-level families: timm's test models, and a 2-stage Swin at 32 px.
TINY_TIMM = {"resnet": ("test_resnet", {}), "convnext": ("test_convnext", {}),
             "swin": ("swin_tiny_patch4_window7_224",
                      dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, patch_size=4, img_size=32)),
             "byobnet": ("test_byobnet", {})}  # a family without block-level support


def save_tiny_timm(path: Path, family: str) -> Path:
    """A tiny random timm model of `family` (TINY_TIMM), saved in timm's folder layout."""
    import timm

    name, args = TINY_TIMM[family]
    torch.manual_seed(4)
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    _randomize_norms(model)
    timm.models.save_for_hf(model, str(path), model_args=args, safe_serialization=True)
    return path


def tiny_text_model(family: str, vocab_size: int, width: int = 16) -> torch.nn.Module:
    """A 2-layer random encoder of `family` (xlmr, distilbert, mpnet, t5, mt5) at width 16."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0)
    if family == "xlmr":
        config = tf.XLMRobertaConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * width, max_position_embeddings=64, **common)
        return tf.XLMRobertaModel(config, add_pooling_layer=False)
    if family == "distilbert":
        config = tf.DistilBertConfig(dim=width, n_layers=2, n_heads=2, hidden_dim=2 * width,
                                     max_position_embeddings=64, **common)
        return tf.DistilBertModel(config)
    if family == "mpnet":
        config = tf.MPNetConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=2 * width, max_position_embeddings=64, **common)
        return tf.MPNetModel(config, add_pooling_layer=False)
    if family == "t5":
        config = tf.T5Config(d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2, **common)
        return tf.T5EncoderModel(config)
    if family == "mt5":  # mT5's gated-GELU feed-forward (wi_0, wi_1, wo)
        config = tf.MT5Config(d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2,
                              feed_forward_proj="gated-gelu", **common)
        return tf.MT5EncoderModel(config)
    raise ValueError(f"no tiny text model for {family!r}")


def save_tiny_text(path: Path, family: str) -> Path:
    """A tiny random text encoder of `family` with a word-level tokenizer, written by save_pretrained."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # Only BERT takes token_type_ids; the other encoders' tokenizers do not produce them.
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)},
                                  model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(5)
    model = tiny_text_model(family, len(vocab))
    _randomize_norms(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
