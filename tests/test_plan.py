"""Plans: rule validation, layer selection, attribution, and budget numbers against hand counts."""

from __future__ import annotations

import pytest

import lilt
from lilt.methods import select

# Hand counts of the tiny towers (tests/tiny.py).
D = 32                                   # width of the tiny ViT and BERT
VIT_BLOCK = (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (2 * D) + (D * 2 * D + 2 * D) + (2 * D * D + D)
VIT_TOTAL = (3 * 8 * 8 * D + D) + D + 17 * D + 2 * VIT_BLOCK + 2 * D   # patch embed, cls, pos (16 + 1), blocks, norm
VIT_NORMS = 2 * (2 * D + 2 * D) + 2 * D                                 # norm1, norm2 per block; final norm
BERT_LAYER = 4 * (D * D + D) + 2 * D + (D * 2 * D + 2 * D) + (2 * D * D + D) + 2 * D
HEADS = 2 * (D * 16 + 16) + 1                                          # two Linear(32 -> 16) + logit scale
ADAPTER_SITE = (D * (D // 4) + D // 4) + ((D // 4) * D + D)            # down + up, reduction 4


def bert_total(model) -> int:
    vocab = model.text.backbone.config.vocab_size
    return vocab * D + 64 * D + 2 * D + 2 * D + 2 * BERT_LAYER          # word, position, type, LayerNorm, layers


def test_budget_matches_hand_count(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"},
                                            {"tower": "vision", "method": "adapter", "layers": "top:1"}]))
    report = lilt.budget(model)
    bert_norms = 2 * D + 2 * (2 * D + 2 * D)
    assert report.by_tower["vision"]["total"] == VIT_TOTAL + 2 * ADAPTER_SITE
    assert report.by_tower["text"]["total"] == bert_total(model)
    assert report.by_tower["heads"] == {"trainable": HEADS, "total": HEADS, "percent": 100.0}
    assert report.by_tower["vision"]["trainable"] == VIT_NORMS + 2 * ADAPTER_SITE
    assert report.by_tower["text"]["trainable"] == bert_norms
    assert report.by_method["layernorm"]["trainable"] == VIT_NORMS + bert_norms
    assert report.by_method["adapter"]["trainable"] == 2 * ADAPTER_SITE
    assert report.trainable == VIT_NORMS + bert_norms + 2 * ADAPTER_SITE + HEADS
    assert report.total == VIT_TOTAL + 2 * ADAPTER_SITE + bert_total(model) + HEADS
    assert report.percent == pytest.approx(100 * report.trainable / report.total)
    data = report.to_dict()
    assert {"trainable", "total", "percent", "by_tower", "by_method"} <= set(data)
    assert "layernorm" in str(report) and f"{report.trainable:,}" in str(report)


def test_full_plan_trains_everything(make_model):
    model = make_model("cnn")
    lilt.apply_plan(model, "recipes/methods/full.yaml")
    assert lilt.budget(model).percent == 100.0


def test_every_parameter_is_attributed(make_model):
    model = make_model("vit")
    plan = lilt.TuningPlan([{"tower": "both", "method": "unlock", "layers": "top:1"},
                            {"tower": "vision", "method": "lock", "layers": "blocks.1"},
                            {"tower": "text", "method": "lora", "layers": "top:1", "options": {"r": 2}}])
    state = lilt.apply_plan(model, plan)
    names = {n for n, _ in model.named_parameters()}
    labels = {n: state.label(n) for n in names}
    assert labels["vision.backbone.blocks.1.attn.qkv.weight"] == "frozen"       # unlocked, then locked again
    assert labels["vision.backbone.blocks.0.attn.qkv.weight"] == "frozen"
    assert labels["text.backbone.encoder.layer.1.attention.output.dense.weight"].startswith("rule 1 ")
    # peft renamed the wrapped weight; its attribution followed the parameter
    assert labels["text.backbone.encoder.layer.1.attention.self.query.base_layer.weight"].startswith("rule 1 ")
    assert labels["text.backbone.encoder.layer.1.attention.self.query.lora_A.lilt_r3.weight"].startswith("rule 3 ")
    assert labels["vision_proj.weight"] == "heads"
    for name, param in model.named_parameters():
        assert param.requires_grad == (labels[name] != "frozen"), name


@pytest.mark.parametrize("rule,message", [
    ({"tower": "vision", "method": "layernorm", "layers": "blocks.*.attn.qkv.*"}, "matched nothing"),
    ({"tower": "vision", "method": "unlock", "layers": "blocks.*.atn.*"}, "matches no parameter.*Close names"),
    ({"tower": "text", "method": "unlock", "layers": "top:5"}, "has 2 blocks"),
    ({"tower": "text", "method": "unlock", "layers": "blocks.1-3"}, "blocks 0-1"),
    ({"tower": "text", "method": "unlock", "layers": "everything"}, "not understood"),
    ({"tower": "text", "method": "lora", "options": {"target_modules": ["query"]}}, "match no Linear.*attention"),
    ({"tower": "vision", "method": "deep", "layers": "top:1"}, "must be 'all'"),
])
def test_rules_that_match_nothing_raise_and_say_why(make_model, rule, message):
    model = make_model("vit")
    with pytest.raises(lilt.ConfigError, match=message):
        lilt.apply_plan(model, lilt.TuningPlan([rule]))


def test_rule_errors_name_the_rule_and_suggest_fixes():
    with pytest.raises(lilt.ConfigError, match="unknown tuning method 'layernrom'.*Did you mean 'layernorm'"):
        lilt.TuningPlan([{"tower": "both", "method": "layernrom"}])
    with pytest.raises(lilt.ConfigError, match="unknown key 'reduction'.*reduction_factor"):
        lilt.Rule(tower="both", method="adapter", options={"reduction": 4})
    with pytest.raises(lilt.ConfigError, match="'towers' is not one of"):
        lilt.Rule(tower="towers", method="lock")
    with pytest.raises(lilt.ConfigError, match=r"r=0 must be in \[1, 4096\]"):
        lilt.Rule(tower="text", method="lora", options={"r": 0})


def test_a_plan_applies_once(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    with pytest.raises(lilt.ConfigError, match="already has a plan"):
        lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "bitfit"}]))


def test_layer_selection(make_model):
    model = make_model("vit")
    tower = model.text
    assert select(tower, "all").blocks == [0, 1]
    assert select(tower, "top:1").blocks == [1] and select(tower, "bottom:1").blocks == [0]
    assert select(tower, "blocks.0,1").blocks == [0, 1]
    glob = select(tower, "encoder.layer.1.attention.*")
    assert glob.blocks == [1]
    assert glob.contains("backbone.encoder.layer.1.attention.self.query.weight")
    assert not glob.contains("backbone.encoder.layer.1.output.dense.weight")


def test_every_recipe_loads_and_round_trips(tmp_path):
    from pathlib import Path

    recipes = sorted(Path("recipes/methods").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"full", "lock-image", "layernorm", "bitfit", "lwa", "lora", "deep"}
    for recipe in recipes:
        plan = lilt.TuningPlan.from_recipe(recipe)
        assert plan.name == recipe.stem and plan.rules and plan.description
        plan.to_json(tmp_path / "plan.json")
        assert lilt.TuningPlan.from_file(tmp_path / "plan.json") == plan


def test_recipe_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plna:\n  rules: []\n")
    with pytest.raises(lilt.ConfigError, match="unknown section .plna.. Did you mean .plan."):
        lilt.TuningPlan.from_recipe(bad)
    bad.write_text("plan:\n  rules:\n    - {tower: both, method: adapter, options: {reduction_factor: four}}\n")
    with pytest.raises(lilt.ConfigError, match="reduction_factor: expected int, got 'four'"):
        lilt.TuningPlan.from_recipe(bad)
    with pytest.raises(lilt.ConfigError, match="does not exist"):
        lilt.TuningPlan.from_recipe(tmp_path / "missing.yaml")
