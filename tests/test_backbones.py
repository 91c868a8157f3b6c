"""Block-level methods beyond ViT/EfficientNet/BERT: ResNet, ConvNeXt, Swin towers; XLM-R, DistilBERT, MPNet, T5.

A matrix over tiny random backbones x {lwa, deep}: the trainable set is what the recipe says, the model
computes the same at step 0, and a training step moves the new parameters and no pretrained one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, clip_loss, embeddings, sample_batch
from tiny import save_tiny_text, save_tiny_timm

import lilt
from lilt.config import VisionConfig
from lilt.errors import ConfigError
from lilt.growth import grow
from lilt.methods.layernorm import is_norm
from lilt.towers.vision import VisionTower

RECIPES = REPO / "recipes" / "methods"
VISION = ("resnet", "convnext", "swin", "byobnet")
TEXT = ("xlmr", "distilbert", "mpnet", "t5", "mt5")
# Each model pairs a vision and a text tower under test (the tiny ViT comes from conftest's tiny_dirs).
PAIRS = [("resnet", "xlmr"), ("convnext", "distilbert"), ("swin", "mpnet"), ("vit", "t5"), ("resnet", "mt5")]
# Written out by hand from the tiny models: family, block kind, blocks, and adapters lwa inserts
# (CNN: one per stage; transformers: two per layer; Swin: two per block, two blocks in each of two stages).
EXPECTED = {
    "resnet": ("resnet", "cnn", 4, 4), "convnext": ("convnext", "cnn", 4, 4), "swin": ("swin", "prenorm", 2, 8),
    "vit": ("vit", "prenorm", 2, 4),
    "xlmr": ("bert", "postnorm", 2, 4), "distilbert": ("distilbert", "postnorm", 2, 4),
    "mpnet": ("mpnet", "postnorm", 2, 4), "t5": ("t5", "prenorm", 2, 4), "mt5": ("t5", "prenorm", 2, 4),
}
# The class of a block `deep` appends, per tower.
DEEP_BLOCK = {"resnet": "InvertedResidual", "convnext": "InvertedResidual", "swin": "SwinTransformerBlock",
              "vit": "Block", "xlmr": "GatedBlock", "distilbert": "GatedBlock", "mpnet": "GatedBlock",
              "t5": "T5Block", "mt5": "MT5Block"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> dict[str, Path]:
    """Local folders of every tiny backbone under test."""
    root = tmp_path_factory.mktemp("families")
    out = {name: save_tiny_timm(root / name, name) for name in VISION}
    out.update({name: save_tiny_text(root / name, name) for name in TEXT})
    return {**out, "vit": tiny_dirs["vit"]}


def build(dirs: dict[str, Path], vision: str, text: str) -> lilt.DualEncoder:
    torch.manual_seed(0)
    return lilt.DualEncoder.from_backbones(str(dirs[vision]), str(dirs[text]), embed_dim=16,
                                           vision_options={"image_size": 32})


def _norm_params(tower: torch.nn.Module) -> set[str]:
    return {f"{m}.{n}" for m, module in tower.named_modules() if is_norm(module)
            for n, _ in module.named_parameters(recurse=False)}


@pytest.mark.parametrize("vision,text", PAIRS, ids=[f"{v}-{t}" for v, t in PAIRS])
def test_towers_know_their_family_and_run_block_by_block(dirs, vision, text):
    model = build(dirs, vision, text)
    for key, tower in ((vision, model.vision), (text, model.text)):
        family, kind, blocks, _ = EXPECTED[key]
        assert (tower.family, tower.block_kind, tower.num_blocks, tower.can_split) == (family, kind, blocks, True)
    model.eval()
    images, batch = sample_batch(model)
    with torch.no_grad():  # stem -> blocks -> finish one by one equals the library's own forward
        whole = model.vision.backbone(images)
        assert (model.vision(images) - whole).abs().max() < 1e-5
        hidden = model.text.backbone(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = hidden[:, 0] if model.text.pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        assert (model.text(batch) - pooled).abs().max() < 1e-5
    if text in ("t5", "mt5"):
        assert model.text.pooling == "mean" and model.text.hidden_size == 16


@pytest.mark.parametrize("recipe", ["lwa", "deep"])
@pytest.mark.parametrize("vision,text", PAIRS, ids=[f"{v}-{t}" for v, t in PAIRS])
def test_recipe_trains_the_intended_parameters_and_keeps_the_function(dirs, vision, text, recipe):
    model = build(dirs, vision, text)
    images, batch = sample_batch(model)
    before = embeddings(model, images, batch)
    blocks = {"vision": model.vision.num_blocks, "text": model.text.num_blocks}
    lilt.apply_plan(model, RECIPES / f"{recipe}.yaml")
    for key, name in ((vision, "vision"), (text, "text")):
        tower = getattr(model, name)
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        if recipe == "lwa":
            adapters = [m for n, m in tower.named_modules() if n.endswith("lilt_adapter")]
            assert len(adapters) == EXPECTED[key][3], key
            expected = {n for n, _ in tower.named_parameters() if ".lilt_adapter." in n} | _norm_params(tower)
        else:
            assert tower.num_blocks == blocks[name] + 1
            assert type(tower.extra_blocks[0]).__name__ == DEEP_BLOCK[key]
            expected = {n for n, _ in tower.named_parameters() if n.startswith("extra_blocks.")}
        assert trainable == expected and trainable, key
    if recipe == "lwa" and text in ("t5", "mt5"):  # T5's RMS norms (T5LayerNorm) count as norm layers
        assert model.text.backbone.encoder.final_layer_norm.weight.requires_grad
    for b, a in zip(before, embeddings(model, images, batch)):
        assert (b - a).abs().max().item() < 1e-5

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):  # a zero-initialized up-projection gives `down` a gradient from the second step on
        optimizer.zero_grad()
        clip_loss(model, images, batch).backward()
        optimizer.step()
    after = model.state_dict()
    for key, old in state.items():
        changed = not torch.equal(old, after[key])
        tower_name, _, rel = key.partition(".")
        if key in trainable:
            assert changed, f"trainable {key} did not change"
        elif tower_name in ("vision", "text") and getattr(model, tower_name).is_pristine_key(rel):
            assert not changed, f"frozen pretrained {key} changed"


def test_full_size_names_resolve_to_their_family():
    for name, family in (("resnet10t", "resnet"), ("convnext_atto", "convnext")):
        tower = VisionTower.from_config(VisionConfig(name=name, pretrained=False))
        assert (tower.family, tower.block_kind, tower.num_blocks) == (family, "cnn", 4)
        assert [tower.block_channels(i) for i in range(4)] == [i["num_chs"] for i in tower.backbone.feature_info][-4:]


@pytest.mark.parametrize("rule", [
    {"tower": "vision", "method": "adapter", "layers": "all"},
    {"tower": "vision", "method": "deep", "layers": "all"},
    {"tower": "vision", "method": "unlock", "layers": "top:2"},
])
def test_block_level_rule_on_unsupported_family_names_backbone_and_families(dirs, rule):
    model = build(dirs, "byobnet", "xlmr")
    assert model.vision.family == "generic" and model.vision.block_kind == "generic"
    with pytest.raises(ConfigError) as err:
        lilt.apply_plan(model, lilt.TuningPlan([rule]))
    message = str(err.value)
    assert "\n" not in message and str(dirs["byobnet"]) in message and "ByobNet" in message
    assert "supported vision families: timm ViT, Swin, ResNet, ConvNeXt" in message


def test_whole_tower_methods_work_on_an_unsupported_family(dirs):
    model = build(dirs, "byobnet", "xlmr")
    images, batch = sample_batch(model)
    before = embeddings(model, images, batch)
    plan = lilt.TuningPlan([{"tower": "vision", "method": "lora", "layers": "all",
                             "options": {"target_modules": ["*conv1_1x1.conv"]}},
                            {"tower": "vision", "method": "layernorm", "layers": "all"},
                            {"tower": "vision", "method": "bitfit", "layers": "all"}])
    lilt.apply_plan(model, plan)
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and _norm_params(model.vision) <= trainable
    for b, a in zip(before, embeddings(model, images, batch)):
        assert (b - a).abs().max().item() < 1e-5
    full = build(dirs, "byobnet", "xlmr")
    lilt.apply_plan(full, RECIPES / "full.yaml")
    assert all(p.requires_grad for p in full.vision.parameters())


def test_cli_info_lists_blocks_and_budget(dirs):
    cmd = [sys.executable, "-m", "lilt.cli", "info", "--recipe", str(RECIPES / "lwa.yaml"),
           "--vision", str(dirs["swin"]), "--text", str(dirs["t5"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2 blocks, prenorm)" in result.stdout and "pooling=mean" in result.stdout
    assert "adapter" in result.stdout and "layernorm" in result.stdout


@pytest.mark.parametrize("vision,text", PAIRS, ids=[f"{v}-{t}" for v, t in PAIRS])
def test_growth_on_each_family_keeps_the_function_and_trains(dirs, vision, text):
    model = build(dirs, vision, text)
    lilt.apply_plan(model, RECIPES / "lwa.yaml")
    images, batch = sample_batch(model)
    before = embeddings(model, images, batch)
    for op in ("depth:vision:1:interleave", "depth:text:1:interleave", "depth:vision:1", "depth:text:1",
               "width:blocks:2"):
        model = grow(model, op).model
    assert model.vision.num_blocks == EXPECTED[vision][2] + 1 and len(model.vision.inserted_blocks) == 1
    assert model.text.num_blocks == EXPECTED[text][2] + 1 and len(model.text.inserted_blocks) == 1
    for b, a in zip(before, embeddings(model, images, batch)):
        assert (b - a).abs().max().item() < 1e-5
    grown = {n: p.detach().clone() for n, p in model.named_parameters() if n in model.plan_state.grown}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        clip_loss(model, images, batch).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    unchanged = [n for n, old in grown.items() if torch.equal(old, params[n])]
    assert grown and not unchanged, unchanged


# What `unlock layers=top:1` trains (all of it, or `what: attention`), per tower, as tower parameter names.
TOP_BLOCK = {"resnet": r"backbone\.layer4\.", "convnext": r"backbone\.stages\.3\.", "swin": r"backbone\.layers\.1\.",
             "vit": r"backbone\.blocks\.1\.", "xlmr": r"backbone\.encoder\.layer\.1\.",
             "distilbert": r"backbone\.transformer\.layer\.1\.", "mpnet": r"backbone\.encoder\.layer\.1\.",
             "t5": r"backbone\.encoder\.block\.1\.", "mt5": r"backbone\.encoder\.block\.1\."}
TOP_ATTENTION = {"swin": r"backbone\.layers\.1\.blocks\.\d\.(norm1|attn)\.",
                 "vit": r"backbone\.blocks\.1\.(norm1|attn)\.",
                 "xlmr": r"backbone\.encoder\.layer\.1\.attention\.",
                 "distilbert": r"backbone\.transformer\.layer\.1\.(attention|sa_layer_norm)\.",
                 "mpnet": r"backbone\.encoder\.layer\.1\.attention\.", "t5": r"backbone\.encoder\.block\.1\.layer\.0\.",
                 "mt5": r"backbone\.encoder\.block\.1\.layer\.0\."}


@pytest.mark.parametrize("what", ["all", "attention"])
@pytest.mark.parametrize("vision,text", PAIRS, ids=[f"{v}-{t}" for v, t in PAIRS])
def test_unlock_top_block_trains_that_block_and_the_rest_runs_without_autograd(dirs, vision, text, what):
    model = build(dirs, vision, text)
    towers = [(key, name) for key, name in ((vision, "vision"), (text, "text"))
              if what == "all" or key in TOP_ATTENTION]
    rules = [{"tower": name, "method": "unlock", "layers": "top:1", "options": {"what": what}} for _, name in towers]
    lilt.apply_plan(model, lilt.TuningPlan(rules))
    for key, name in towers:
        tower = getattr(model, name)
        pattern = (TOP_BLOCK if what == "all" else TOP_ATTENTION)[key]
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert trainable and trainable == {n for n, _ in tower.named_parameters() if re.match(pattern, n)}, key
        assert tower.frozen_prefix_depth() == tower.num_blocks - 1
