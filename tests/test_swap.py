"""Text-tower swap: the vision side stays exactly as trained and frozen; the result saves and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lilt
from lilt.config import ConfigError
from lilt.swap import swap_text_tower
from helpers import sample_batch
from tiny import save_tiny_bert

REPO = Path(__file__).resolve().parents[1]


def trained_model(make_model) -> lilt.DualEncoder:
    """A tiny lwa model whose trainable tensors were moved off their initial values, as training would."""
    model = make_model("vit")
    lilt.apply_plan(model, REPO / "recipes" / "methods" / "lwa.yaml")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_swap_keeps_the_vision_side_and_trains_only_the_text_side(make_model, tmp_path: Path) -> None:
    model = trained_model(make_model)
    other = save_tiny_bert(tmp_path / "bert48", hidden_size=48, seed=5)
    swapped = swap_text_tower(model, str(other))
    images, _ = sample_batch(model)
    model.eval(), swapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(swapped.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    assert swapped.text.hidden_size == 48 and swapped.text_proj.in_features == 48
    trainable = [n for n, p in swapped.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(("vision.", "vision_proj.")) for n in trainable)
    assert any(n.startswith("text.") for n in trainable) and "text_proj.weight" in trainable
    assert any(".r1" in n or "adapter" in n for n, _ in swapped.vision.named_parameters())  # tuned modules kept
    plan = swapped.plan_state.plan
    assert [r.method for r in plan.rules if r.tower == "vision"] == ["adapter", "layernorm", "lock"]
    assert plan.frozen_heads == ["vision"]


def test_swapped_model_round_trips_through_save_and_from_pretrained(make_model, tmp_path: Path) -> None:
    swapped = swap_text_tower(trained_model(make_model), str(save_tiny_bert(tmp_path / "b", seed=7)),
                              text_plan=lilt.TuningPlan.from_dict(
                                  {"rules": [{"tower": "text", "method": "layernorm"}], "name": "ln"}))
    with torch.no_grad():
        swapped.text_proj.weight.add_(0.1)
    swapped.save_pretrained(tmp_path / "ckpt")
    reloaded = lilt.DualEncoder.from_pretrained(tmp_path / "ckpt").eval()
    swapped.eval()
    images, text = sample_batch(swapped)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), swapped.encode_image(images))
        torch.testing.assert_close(reloaded.encode_text(text), swapped.encode_text(text))
    assert not reloaded.vision_proj.weight.requires_grad and reloaded.text_proj.weight.requires_grad
    assert [r.method for r in reloaded.plan_state.plan.rules if r.tower == "text"] == ["layernorm"]


def test_a_swap_with_nothing_to_train_on_the_text_side_is_refused(make_model, tmp_path: Path) -> None:
    vision_only = lilt.TuningPlan.from_dict({"rules": [{"tower": "vision", "method": "layernorm"}]})
    with pytest.raises(ConfigError, match="no text-side method"):
        swap_text_tower(trained_model(make_model), str(save_tiny_bert(tmp_path / "b")), text_plan=vision_only)


def test_lilt_train_with_an_init_section_swaps_and_trains_only_the_text_side(make_model, tmp_path: Path) -> None:
    import yaml

    from lilt.cli import main

    source = trained_model(make_model)
    source.save_pretrained(tmp_path / "source")
    recipe = yaml.safe_load((REPO / "recipes" / "multilingual" / "swap-text-tower.yaml").read_text())
    recipe["init"] = {"from": str(tmp_path / "source"), "swap_text": str(save_tiny_bert(tmp_path / "b", seed=9))}
    recipe["data"] = {"source": "builtin:tiny-random", "num_workers": 0, "options": {"n": 16}}
    recipe["train"].update(steps=3, batch_size=8, warmup_steps=1, eval_every=3, save_every=3, report_to=[],
                           head_warmup_epochs=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path / "run")]) == 0
    trained = lilt.DualEncoder.from_pretrained(tmp_path / "run" / "model").eval()
    before = source.state_dict()
    for key, value in trained.state_dict().items():
        if key.startswith(("vision.", "vision_proj.")):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    fresh = swap_text_tower(source, recipe["init"]["swap_text"]).state_dict()  # the text backbone untouched
    norms = [k for k in fresh if k.startswith("text.") and "LayerNorm.weight" in k]
    assert norms and all(not torch.equal(trained.state_dict()[k], fresh[k]) for k in norms)  # the text side trained


def test_vision_rules_keep_their_index_so_named_modules_line_up(make_model, tmp_path: Path) -> None:
    # LoRA names its modules after the rule's index (lilt_r2 here); the swapped plan must build the same names.
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan.from_dict({"rules": [
        {"tower": "text", "method": "layernorm"}, {"tower": "vision", "method": "lora", "options": {"r": 2}}]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    swapped = swap_text_tower(model, str(save_tiny_bert(tmp_path / "b", seed=3))).eval()
    images, _ = sample_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(swapped.encode_image(images), model.eval().encode_image(images), rtol=0, atol=0)
    assert [r.method for r in swapped.plan_state.plan.rules][:3] == ["lock", "lora", "lock"]
