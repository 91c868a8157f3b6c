"""Shared fixtures: tiny random towers saved as local directories, and model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import LWA, NO_DROPOUT  # noqa: E402
from tiny import save_tiny_bert, save_tiny_cnn, save_tiny_vit  # noqa: E402


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


@pytest.fixture()
def recipe(tiny_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A training recipe on the tiny ViT + BERT (no dropout, so runs on 1 and 2 processes can match)."""
    data = {
        "model": {"vision": {"name": str(tiny_dirs["vit"]), "image_size": 32},
                  "text": {"name": str(tiny_dirs["bert"]), **NO_DROPOUT}, "embed_dim": 16},
        "plan": yaml.safe_load(LWA.read_text())["plan"],
        "train": {"steps": 6, "batch_size": 8, "log_every": 1, "report_to": [], "warmup_steps": 2, "lr": 1e-3},
        "data": {"source": "builtin:tiny-random", "num_workers": 0, "options": {"n": 32}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
