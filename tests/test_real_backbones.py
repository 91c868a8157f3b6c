"""The default packaged pair (EfficientNet-Lite0 + multilingual-e5-small) inside a DualEncoder."""

from __future__ import annotations

import copy

import pytest
import torch

import lilt


@pytest.fixture(scope="module")
def base():
    """The default model, loaded once (fully offline)."""
    return lilt.DualEncoder.from_backbones().eval()


def _planned(base, recipe: str) -> lilt.DualEncoder:
    model = copy.deepcopy(base)
    lilt.apply_plan(model, f"recipes/methods/{recipe}.yaml")
    return model


def test_default_backbones_and_conventions(base):
    assert base.vision.family == "efficientnet" and base.vision.num_blocks == 7 and base.vision.hidden_size == 1280
    assert base.text.num_blocks == 12 and base.text.hidden_size == 384 and base.text.block_kind == "postnorm"
    assert (base.text.pooling, base.text.prefix, base.text.max_length) == ("mean", "query: ", 32)
    assert base.vision.data_config["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("recipe,low,high", [("layernorm", 0.0, 1.0), ("bitfit", 0.0, 1.0), ("lwa", 1.0, 8.0),
                                             ("full", 100.0, 100.0)])
def test_recipe_budgets(base, recipe, low, high):
    report = lilt.budget(_planned(base, recipe))
    assert low <= report.percent <= high


def test_layernorm_checkpoint_is_tiny(base, tmp_path):
    model = _planned(base, "layernorm")
    model.save_pretrained(tmp_path)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size < 0.02 * full  # measured: 1.97 MB of 485 MB (0.41%)


def test_lwa_is_identity_at_init_and_round_trips(base, tmp_path):
    from PIL import Image
    from skimage import data

    model = _planned(base, "lwa")
    pixels = torch.stack([model.image_transform()(Image.fromarray(data.chelsea())),
                          model.image_transform()(Image.fromarray(data.coffee()))])
    captions = ["a cat on a sofa", "una taza de café"]
    with torch.inference_mode():
        before = base.encode_image(pixels), base.encode_text(captions)
        after = model.encode_image(pixels), model.encode_text(captions)
    for b, a in zip(before, after):
        assert (b - a).abs().max() < 1e-5
    model.save_pretrained(tmp_path)
    loaded = lilt.DualEncoder.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_text(captions), after[1], atol=1e-6)
        assert torch.allclose(loaded.encode_image(pixels), after[0], atol=1e-6)
