"""Checkpoints: trainable-only delta, backbone hash check, strict keys, atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import embeddings, sample_batch
from safetensors.torch import load_file, save_file

import lilt
from tiny import save_tiny_bert


@pytest.fixture()
def saved(make_model, tmp_path):
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "adapter"},
                                            {"tower": "both", "method": "layernorm"}], name="lwa"))
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_checkpoint_holds_only_trained_and_added_tensors(saved):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == trainable  # adapters and norms train, and nothing frozen is stored
    manifest = json.loads((path / "lilt_config.json").read_text())
    assert manifest["plan"]["name"] == "lwa" and manifest["lilt_version"] == lilt.__version__
    assert manifest["backbones"]["vision"]["sha256"] == model.vision.backbone_sha256
    assert manifest["model"]["embed_dim"] == 16
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_a_different_backbone_is_refused(saved, tiny_dirs, tmp_path):
    _, path = saved
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_dirs["bert"], other)
    weights = load_file(other / "model.safetensors")
    weights["encoder.layer.0.output.dense.weight"][0, 0] += 1.0  # one tampered weight
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(lilt.BackboneMismatchError, match="text backbone.*check_backbones=False"):
        lilt.DualEncoder.from_pretrained(path, text=str(other))
    model = lilt.DualEncoder.from_pretrained(path, text=str(other), check_backbones=False)
    recorded = json.loads((path / "lilt_config.json").read_text())["backbones"]["text"]["sha256"]
    assert model.text.backbone_sha256 != recorded


def test_moved_backbone_loads_with_override(saved, tmp_path):
    model, path = saved
    moved = save_tiny_bert(tmp_path / "moved")  # same seed, same weights, new place
    loaded = lilt.DualEncoder.from_pretrained(path, text=str(moved))
    images, text = sample_batch(model)
    for a, b in zip(embeddings(model, images, text), embeddings(loaded, images, text)):
        assert torch.allclose(a, b, atol=1e-6)


def test_tampered_or_torn_delta_is_detected(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(lilt.CheckpointError, match="does not match the sha256"):
        lilt.DualEncoder.from_pretrained(path)


def test_delta_with_wrong_keys_is_refused(saved, make_model):
    _, path = saved
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    with pytest.raises(lilt.CheckpointError, match="unexpected.*lilt_adapter"):
        model.load_delta(path / "model.safetensors")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(lilt.CheckpointError, match="lilt_config.json"):
        lilt.DualEncoder.from_pretrained(tmp_path)
    (tmp_path / "lilt_config.json").write_text(json.dumps({"format": "lilt-dual-encoder", "format_version": 99}))
    with pytest.raises(lilt.CheckpointError, match="v99"):
        lilt.DualEncoder.from_pretrained(tmp_path)


def test_unfrozen_batchnorm_statistics_are_saved(make_model, tmp_path):
    model = make_model("cnn", vision_options={"image_size": 32, "freeze_bn_stats": False})
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "vision", "method": "layernorm"}]))
    model.train()
    images, text = sample_batch(model)
    model(images, **text)  # BatchNorm in train mode: running statistics move
    model.save_pretrained(tmp_path / "ckpt")
    assert any(k.endswith("running_mean") for k in load_file(tmp_path / "ckpt" / "model.safetensors"))
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "ckpt")
    for a, b in zip(embeddings(model, images, text), embeddings(loaded, images, text)):
        assert torch.allclose(a, b, atol=1e-6)


def test_save_overwrites_an_earlier_checkpoint(saved):
    model, path = saved
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    model.save_pretrained(path)
    loaded = lilt.DualEncoder.from_pretrained(path)
    assert torch.equal(loaded.vision_proj.weight, model.vision_proj.weight)
