"""The method matrix: every tuning method x every tiny tower (ViT, CNN, BERT), every behaviour."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import TOWER_CASES, clip_loss, embeddings, sample_batch

import lilt

# Hand-written expectations (independent of lilt's code): which tower parameter names a method
# makes trainable, per tower. Names are relative to the backbone, or start with extra_blocks.
NORMS = {"vit": r"(norm\d?|norm_pre)\.(weight|bias)$", "cnn": r"(^|\.)bn\d\.(weight|bias)$",
         "bert": r"LayerNorm\.(weight|bias)$"}
LAST_BLOCK = {"vit": r"^blocks\.1\.", "cnn": r"^blocks\.4\.", "bert": r"^encoder\.layer\.1\."}
ATTENTION = {"vit": r"^blocks\.\d\.(norm1|attn|ls1)\.", "bert": r"^encoder\.layer\.\d\.attention\."}
LORA = {"vit": r"\.attn\.(qkv|proj)\.lora_[AB]\.", "cnn": r"\.conv_pwl?\.lora_[AB]\.",
        "bert": r"\.attention\.self\.(query|value)\.lora_[AB]\."}

CASES = {  # id: (method, layers, options, tower -> regex of the names that must train, or None: unsupported)
    "lock": ("lock", "all", {}, {t: r"^$" for t in TOWER_CASES}),
    "layernorm": ("layernorm", "all", {}, NORMS),
    "bitfit": ("bitfit", "all", {}, {t: r"\.bias$" for t in TOWER_CASES}),
    "adapter": ("adapter", "all", {}, {t: r"\.lilt_adapter\." for t in TOWER_CASES}),
    "adapter-parallel": ("adapter", "all", {"placement": "parallel"},
                         {"vit": r"\.lilt_adapter\.", "bert": r"\.lilt_adapter\.", "cnn": None}),
    "lora": ("lora", "all", {"r": 2}, LORA),
    "ia3": ("ia3", "all", {}, {t: r"\.ia3_l\." for t in TOWER_CASES}),
    "unlock-top1": ("unlock", "top:1", {}, LAST_BLOCK),
    "unlock-attention": ("unlock", "all", {"what": "attention"}, {**ATTENTION, "cnn": None}),
    "unlock-all": ("unlock", "all", {}, {t: r"." for t in TOWER_CASES}),
    "deep": ("deep", "all", {"num_blocks": 2}, {t: r"^extra_blocks\." for t in TOWER_CASES}),
}
MATRIX = [pytest.param(case, tower, id=f"{case}-{tower}") for case in CASES for tower in TOWER_CASES
          if CASES[case][3][tower] is not None]
UNSUPPORTED = [pytest.param(case, tower, id=f"{case}-{tower}") for case in CASES for tower in TOWER_CASES
               if CASES[case][3][tower] is None]


def _build(make_model, case: str, tower: str):
    vision, text, which = TOWER_CASES[tower]
    method, layers, options, expected = CASES[case]
    model = make_model(vision, text)
    plan = lilt.TuningPlan([{"tower": which, "method": method, "layers": layers, "options": options}], name=case)
    return model, plan, which, expected[tower]


def _apply(make_model, case: str, tower: str):
    model, plan, which, pattern = _build(make_model, case, tower)
    lilt.apply_plan(model, plan)
    return model, which, pattern


@pytest.mark.parametrize("case,tower", UNSUPPORTED)
def test_unsupported_combinations_raise_a_clear_error(make_model, case, tower):
    model, plan, _, _ = _build(make_model, case, tower)
    with pytest.raises(lilt.ConfigError, match=r"rule 1 \(vision/.*(not available|needs transformer blocks)"):
        lilt.apply_plan(model, plan)


def _short(name: str) -> str:
    return name[len("backbone."):] if name.startswith("backbone.") else name


@pytest.mark.parametrize("case,tower", MATRIX)
def test_exactly_intended_parameters_train(make_model, case, tower):
    model, which, pattern = _apply(make_model, case, tower)
    tower_module = getattr(model, which)
    trainable = {_short(n) for n, p in tower_module.named_parameters() if p.requires_grad}
    expected = {_short(n) for n, _ in tower_module.named_parameters() if re.search(pattern, _short(n))}
    assert trainable == expected
    if case != "lock":
        assert trainable, "the rule must make something trainable"
    other = model.text if which == "vision" else model.vision
    assert not any(p.requires_grad for p in other.parameters()), "the other tower stays frozen"
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith(("vision.", "text.")))


@pytest.mark.parametrize("case,tower", MATRIX)
def test_methods_leave_embeddings_unchanged_at_step_0(make_model, case, tower):
    model, plan, _, pattern = _build(make_model, case, tower)
    images, text = sample_batch(model)
    before = embeddings(model, images, text)
    lilt.apply_plan(model, plan)
    after = embeddings(model, images, text)
    for b, a in zip(before, after):
        assert (b - a).abs().max().item() < 1e-5


@pytest.mark.parametrize("case,tower", MATRIX)
def test_optimizer_steps_change_trainable_params_and_nothing_else(make_model, case, tower):
    model, which, _ = _apply(make_model, case, tower)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    images, text = sample_batch(model)
    # Two steps: zero-initialized branches (adapter up, LoRA B, deep projections) give their other
    # weights a gradient only once the first step has moved them off zero.
    for _ in range(2):
        optimizer.zero_grad()
        clip_loss(model, images, text).backward()
        optimizer.step()
    after = model.state_dict()
    for key, old in before.items():
        tower_name, _, rel = key.partition(".")
        changed = not torch.equal(old, after[key])
        if key in trainable:
            assert changed, f"trainable {key} did not change"
        elif tower_name in ("vision", "text") and getattr(model, tower_name).is_pristine_key(rel):
            assert not changed, f"frozen pretrained {key} changed (BatchNorm statistics included)"


@pytest.mark.parametrize("case,tower", MATRIX)
def test_save_load_round_trip_gives_identical_embeddings(make_model, case, tower, tmp_path):
    model, _, _ = _apply(make_model, case, tower)
    with torch.no_grad():  # move trained tensors off their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    images, text = sample_batch(model)
    model.train()
    model(images, **text)  # a train-mode forward: frozen BatchNorm statistics must not move
    expected = embeddings(model, images, text)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "ckpt")
    for e, got in zip(expected, embeddings(loaded, images, text)):
        assert torch.allclose(e, got, atol=1e-6)
    assert set(loaded.delta_state_dict()) == set(model.delta_state_dict())
    assert lilt.budget(loaded).trainable == lilt.budget(model).trainable


def test_frozen_prefix_runs_without_autograd(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "vision", "method": "layernorm", "layers": "top:1"}]))
    assert model.vision.frozen_prefix_depth() == 1
    assert model.text.frozen_prefix_depth() == model.text.num_blocks  # fully frozen text tower
    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
             for i, block in enumerate(model.vision.blocks())]
    images, text = sample_batch(model)
    model.train()
    clip_loss(model, images, text).backward()
    for hook in hooks:
        hook.remove()
    assert seen == {0: False, 1: True}, "block 0 is frozen and must run under no_grad; block 1 trains"
    assert all(p.grad is None for n, p in model.vision.named_parameters() if not p.requires_grad)


def test_input_gradients_flow_through_a_frozen_tower(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "lock"}]))
    images, _ = sample_batch(model)
    images.requires_grad_(True)
    model.encode_image(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_frozen_batchnorm_stays_in_eval_mode(make_model):
    model = make_model("cnn")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "vision", "method": "layernorm"}]))
    model.train()
    norms = [m for m in model.vision.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert all(m.weight.requires_grad for m in norms), "norm tuning trains the BatchNorm affine terms"
    lilt.apply_plan(deep := make_model("cnn"), lilt.TuningPlan([{"tower": "vision", "method": "deep"}]))
    deep.train()
    added = [m for m in deep.vision.extra_blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert added and all(m.training for m in added), "BatchNorm in new blocks trains normally"


def test_two_lora_rules_on_one_module_are_both_active(make_model):
    model = make_model("vit")
    rules = [{"tower": "text", "method": "lora", "options": {"r": 2}},
             {"tower": "text", "method": "lora", "layers": "top:1", "options": {"r": 4}}]
    lilt.apply_plan(model, lilt.TuningPlan(rules))
    query = model.text.backbone.encoder.layer[1].attention.self.query
    assert sorted(query.active_adapters) == ["lilt_r1", "lilt_r2"]
    assert all(p.requires_grad for n, p in query.named_parameters() if "lora_" in n)


def test_deep_must_precede_rules_that_add_modules(make_model):
    model = make_model("vit")
    rules = [{"tower": "vision", "method": "adapter"}, {"tower": "vision", "method": "deep"}]
    with pytest.raises(lilt.ConfigError, match="before adapter"):
        lilt.apply_plan(model, lilt.TuningPlan(rules))
