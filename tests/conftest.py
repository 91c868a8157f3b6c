"""Shared fixtures: tiny random towers saved as local directories, and model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny import save_tiny_bert, save_tiny_cnn, save_tiny_vit  # noqa: E402

# Which backbone directories make up the model for each tower under test, and which tower it is.
TOWER_CASES = {"vit": ("vit", "bert", "vision"), "cnn": ("cnn", "bert", "vision"), "bert": ("vit", "bert", "text")}
CAPTIONS = ["a cat on a tree", "the red car", "a small dog with a ball", "a bird in the blue sky"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local directories of a 2-block ViT, a small EfficientNet and a 2-layer BERT."""
    root = tmp_path_factory.mktemp("backbones")
    return {"vit": save_tiny_vit(root / "vit"), "cnn": save_tiny_cnn(root / "cnn"),
            "bert": save_tiny_bert(root / "bert")}


@pytest.fixture()
def make_model(tiny_dirs: dict[str, Path]):
    """Build a DualEncoder over tiny towers: make_model('vit'|'cnn', **ModelConfig options)."""
    import lilt

    def build(vision: str = "vit", text: str = "bert", **options) -> "lilt.DualEncoder":
        torch.manual_seed(0)
        options.setdefault("embed_dim", 16)
        options.setdefault("vision_options", {"image_size": 32})  # keeps the CNN's forward tiny too
        return lilt.DualEncoder.from_backbones(str(tiny_dirs[vision]), str(tiny_dirs[text]), **options)

    return build


def sample_batch(model, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random images at the vision tower's resolution and tokenized captions."""
    size = model.vision.data_config["input_size"][-1]
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, model.tokenize(CAPTIONS[:n])


def embeddings(model, images: torch.Tensor, text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.encode_image(images), model.encode_text(text)
    model.train(was_training)
    return out


def clip_loss(model, images: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric InfoNCE over a batch (enough to drive a training step in tests)."""
    out = model(images, **text)
    logits = out.logits_per_image()
    labels = torch.arange(len(images))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.t(), labels)) / 2
