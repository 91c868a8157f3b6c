"""Towers: split forward equals the backbone's own, prefix/suffix, tokenization, loading errors."""

from __future__ import annotations

import pytest
import torch
from helpers import CAPTIONS

import lilt
from lilt.config import TextConfig, VisionConfig


@pytest.mark.parametrize("vision", ["vit", "cnn"])
def test_vision_split_matches_timm_forward(make_model, vision):
    tower = make_model(vision).vision.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = tower.backbone.forward_head(tower.backbone.forward_features(images), pre_logits=True)
        assert torch.allclose(tower(images), reference, atol=1e-6)
        for depth in range(tower.num_blocks + 1):  # any frozen prefix depth gives the same features
            hidden, context = tower.forward_prefix(images, depth)
            assert torch.allclose(tower.forward_suffix(hidden, context, depth), reference, atol=1e-5)
    assert tower.hidden_size == reference.shape[-1]


def test_text_split_matches_transformers_forward(make_model):
    tower = make_model().text.eval()
    batch = tower.tokenize(CAPTIONS)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1], "needs padding to be a test"
    with torch.no_grad():
        hidden = tower.backbone(**batch).last_hidden_state
        reference = hidden[:, 0]  # BERT convention without sentence-transformers pooling: CLS
        assert torch.allclose(tower(batch), reference, atol=1e-6)
        for depth in range(tower.num_blocks + 1):
            h, context = tower.forward_prefix(batch, depth)
            assert torch.allclose(tower.forward_suffix(h, context, depth), reference, atol=1e-5)


def test_mean_pooling_ignores_padding(tiny_dirs):
    tower = lilt.TextTower.from_config(TextConfig(name=str(tiny_dirs["bert"]), pooling="mean")).eval()
    alone = tower(tower.tokenize(["a cat"]))
    padded = tower(tower.tokenize(["a cat", "a small dog with a ball on the tree"]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_prefix_and_max_length(tiny_dirs):
    tower = lilt.TextTower.from_config(TextConfig(name=str(tiny_dirs["bert"]), prefix="photo of ", max_length=5))
    ids = tower.tokenize(["a cat on a tree in the sky"])["input_ids"][0].tolist()
    vocab = tower.tokenizer.get_vocab()
    assert len(ids) == 5 and ids[1:3] == [vocab["photo"], vocab["of"]]


def test_image_transform_uses_timm_data_config(make_model):
    from PIL import Image

    tower = make_model("vit").vision
    pixels = tower.image_transform()(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert pixels.shape == (3, 32, 32)
    assert pixels[0].mean() == pytest.approx((1 - tower.data_config["mean"][0]) / tower.data_config["std"][0], abs=1e-3)


def test_channels_last_for_cnn(make_model):
    tower = make_model("cnn").vision
    assert tower.channels_last and tower.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_backbone_hash_is_stable_and_sensitive(make_model):
    a, b = make_model("vit"), make_model("vit")
    assert a.vision.backbone_sha256 == b.vision.backbone_sha256
    assert a.vision.backbone_sha256 != a.text.backbone_sha256
    with torch.no_grad():
        a.vision.backbone.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert lilt.towers.base.state_dict_sha256(a.vision.backbone.state_dict()) != b.vision.backbone_sha256


def test_loading_errors_are_clear(tmp_path, tiny_dirs):
    with pytest.raises(lilt.ConfigError, match="unknown vision backbone 'vit_tiny_patch16_2244'.*Did you mean"):
        lilt.VisionTower.from_config(VisionConfig(name="vit_tiny_patch16_2244"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(lilt.ConfigError, match="no model.safetensors.*never a pickle"):
        lilt.VisionTower.from_config(VisionConfig(name=str(tmp_path)))
    with pytest.raises(lilt.ConfigError, match="does not exist"):
        lilt.VisionTower.from_config(VisionConfig(name="local-dir:" + str(tmp_path / "nope")))
    with pytest.raises(lilt.ConfigError, match=r"no \*.safetensors"):
        lilt.TextTower.from_config(TextConfig(name=str(tmp_path)))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model = lilt.DualEncoder.from_backbones(str(tiny_dirs["vit"]), str(tiny_dirs["bert"]))
        model.encode_image(torch.zeros(3, 32, 32))
