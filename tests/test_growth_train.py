"""Growth inside training: staged schedule, optimizer-state migration, search, resume, 2 processes, `lilt grow`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lilt
from lilt.config import ConfigError, DataConfig, TrainConfig
from lilt.growth import grow_, migrate_optimizer_state
from lilt.optim import lr_lambda, make_optimizer, scheduler_at
from lilt.training import train
from helpers import clip_loss, embeddings, sample_batch
from helpers import LWA, NO_DROPOUT, REPO, lilt_train, losses, max_difference, weights

STAGES = ("train.steps=12", "train.growth=[{steps: 4, data: 0.5}, {steps: 4, data: 0.75, grow: [depth:text:1, "
          "width:adapter:2, 'shared:1:16'], inherit_momentum: 0.8}, {steps: 4, data: 1.0, grow: "
          "['depth:vision:1:interleave', 'width:heads:2']}]")


def tiny(make_model) -> lilt.DualEncoder:
    model = make_model("vit", text_options=NO_DROPOUT)
    lilt.apply_plan(model, LWA)
    return model


def test_a_growth_stage_inside_two_processes_matches_one_process(recipe: Path, tmp_path: Path) -> None:  # noqa: F811
    lilt_train(recipe, tmp_path / "one", *STAGES)
    lilt_train(recipe, tmp_path / "two", *STAGES, processes=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(k.startswith("shared_encoder.") for k in one) and any(".inserted_blocks." in k for k in one)
    # The shared encoder's output projection starts at zero, so the gradients of its inner weights start as
    # float noise (q/k of attention over one pooled token stay noise: a softmax over one key is 1) and Adam
    # scales that noise up to a step's size, which differs with the reduction order of 2 processes (measured:
    # fc1 1.02e-4 apart on one machine, everything else under 1.4e-5). Those inner weights are compared by
    # what the model computes with them; every other weight must match.
    inner = [k for k in one if k.startswith("shared_encoder.blocks.")]
    assert max_difference({k: v for k, v in one.items() if k not in inner},
                          {k: v for k, v in two.items() if k not in inner}) < 1e-4
    config = json.loads((tmp_path / "two" / "model" / "lilt_config.json").read_text())
    assert [r["op"] for r in config["growth"]] == ["depth:text:1", "width:adapter:2", "shared:1:16",
                                                   "depth:vision:1:interleave", "width:heads:2"]
    assert [r["stage"] for r in config["growth"]] == [2, 2, 2, 3, 3]
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    ends = [h["stage_end"] for h in history if "stage_end" in h]
    assert [e["pairs"] for e in ends] == [16, 24, 32]  # 50% / 75% / 100% of 32 pairs
    assert ends[0]["trainable"] < ends[1]["trainable"] < ends[2]["trainable"]
    model = lilt.DualEncoder.from_pretrained(tmp_path / "two" / "model")  # rebuilds the grown architecture
    assert model.shared_encoder is not None and model.config.embed_dim == 32
    batch = sample_batch(model)
    single = embeddings(lilt.DualEncoder.from_pretrained(tmp_path / "one" / "model"), *batch)
    for a, b in zip(single, embeddings(model, *batch)):
        assert (a - b).abs().max() < 1e-5


def test_resuming_inside_a_grown_stage_ends_with_the_same_weights(recipe: Path, tmp_path: Path) -> None:  # noqa: F811
    lilt_train(recipe, tmp_path / "straight", *STAGES, "train.save_every=6", "train.keep_checkpoints=5")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-6"  # inside stage 2, after its growth
    assert json.loads((checkpoint / "lilt_config.json").read_text())["growth"]
    lilt_train(recipe, tmp_path / "resumed", *STAGES, f"train.resume={checkpoint}")
    assert max_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6


def test_optimizer_state_migrates_and_the_schedule_continues(make_model) -> None:
    model = tiny(make_model)
    config = TrainConfig(steps=100, warmup_steps=5, lr=1e-3, report_to=[])
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    images, text = sample_batch(model)
    for _ in range(3):
        clip_loss(model, images, text).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    names = {p: n for n, p in model.named_parameters()}
    before = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    down = next(n for n in before if n.endswith("lilt_adapter.down.weight") and n.startswith("text."))
    wider = grow_(model, "width:adapter:2")
    result = grow_(model, "depth:text:1")
    assert down in wider.widened
    for mode in ("migrate", "copy"):
        new = make_optimizer(model, config)
        carried = migrate_optimizer_state(optimizer, names, new, model, {**wider.widened, **result.widened}, mode)
        assert carried == len(before)
        params = dict(model.named_parameters())
        state = new.state[params[down]]
        old = before[down]["exp_avg"]
        assert torch.equal(state["exp_avg"][:old.shape[0]], old)
        assert float(state["step"]) == 3.0
        tail = state["exp_avg"][old.shape[0]:]
        assert torch.equal(tail, torch.zeros_like(tail)) if mode == "migrate" else torch.equal(tail, old)
        untouched = next(n for n in before if n == "logit_scale")
        assert torch.equal(new.state[params[untouched]]["exp_avg_sq"], before[untouched]["exp_avg_sq"])
        assert not any(params[n] in new.state for n in result.added)  # new blocks start AdamW from scratch
        resumed = scheduler_at(new, config, 3)
        assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_restart_schedule_warms_up_again_at_its_stage() -> None:
    config = TrainConfig.from_dict({"steps": 20, "warmup_steps": 4, "growth": [
        {"steps": 10, "data": 0.5}, {"steps": 10, "data": 1.0, "restart_schedule": True}]})
    factor = lr_lambda(config)
    assert factor(9) < 0.1 and factor(10) == pytest.approx(1 / 5) and factor(14) == pytest.approx(1.0)
    continued = lr_lambda(TrainConfig.from_dict({"steps": 20, "warmup_steps": 4, "growth": [
        {"steps": 10, "data": 0.5}, {"steps": 10, "data": 1.0}]}))
    assert continued(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 16)))


def test_candidate_search_keeps_the_best_by_validation_recall(make_model, tmp_path: Path) -> None:
    model = tiny(make_model)
    config = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "steps": 8, "batch_size": 8, "report_to": [], "lr": 1e-3,
        "warmup_steps": 1, "growth": [{"steps": 3, "data": 0.5},
                                      {"steps": 5, "data": 1.0, "candidates": ["depth:text:1", "width:adapter:2"],
                                       "search_steps": 2}]})
    result = train(model, "builtin:tiny-random", config,
                   data_config=DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 32}))
    record = model.growth[-1]
    scores = record["search"]
    assert [s["candidate"] for s in scores] == ["depth:text:1", "width:adapter:2"]
    best = max(scores, key=lambda s: s["val_mean_R@1"])
    assert record["op"] == best["candidate"] and record["stage"] == 2
    assert result.steps == 8 and len(result.stages) == 2
    assert result.model is model
    assert any("search" in h for h in result.history)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == result.stages[-1]["trainable"]


def test_growth_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="add up to 6"):
        TrainConfig.from_dict({"steps": 10, "growth": [{"steps": 3}, {"steps": 3, "grow": ["depth:text:1"]}]})
    with pytest.raises(ConfigError, match="not understood"):
        TrainConfig.from_dict({"steps": 3, "growth": [{"steps": 3, "grow": ["depth:txt"]}]})
    with pytest.raises(ConfigError, match="must not shrink"):
        TrainConfig.from_dict({"steps": 6, "growth": [{"steps": 3, "data": 0.5}, {"steps": 3, "data": 0.2}]})
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig.from_dict({"steps": 3, "growth": [{"steps": 3, "inherit_from": "ema"}]})
    with pytest.raises(ConfigError, match="either"):
        TrainConfig.from_dict({"steps": 30, "growth": [{"steps": 30, "grow": ["depth:text:1"],
                                                        "candidates": ["width:heads:2"]}]})


def test_lilt_grow_cli_preserves_the_model_and_writes_nothing_on_a_bad_op(make_model, tmp_path: Path) -> None:
    model = tiny(make_model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "base")
    cli = [sys.executable, "-m", "lilt.cli", "grow", "--model", str(tmp_path / "base")]
    ok = subprocess.run([*cli, "--op", "depth:text:1", "--op", "width:heads:2", "--out", str(tmp_path / "grown")],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-2000:]
    grown = lilt.DualEncoder.from_pretrained(tmp_path / "grown")
    images, text = sample_batch(model)
    (a_img, a_txt), (b_img, b_txt) = embeddings(model, images, text), embeddings(grown, images, text)
    assert float((a_img - b_img[:, :16]).abs().max()) < 1e-5 and float((a_txt - b_txt[:, :16]).abs().max()) < 1e-5
    assert lilt.budget(grown).trainable > lilt.budget(model).trainable
    bad = subprocess.run([*cli, "--op", "depth:text:1", "--op", "width:lora:2", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "lora" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_staged_growth_recipes_are_valid() -> None:
    for path in sorted((REPO / "recipes" / "growth").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        config = TrainConfig.from_dict(data["train"], where=str(path))
        assert config.growth and sum(s.steps for s in config.growth) == config.steps
        lilt.TuningPlan.from_dict(data["plan"])


def test_a_stage_can_add_a_new_source_and_a_grown_checkpoint_grows_again(make_model, tmp_path: Path) -> None:
    model = tiny(make_model)
    data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 32})
    first = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "first"), "steps": 4, "batch_size": 8, "report_to": [], "warmup_steps": 1,
        "growth": [{"steps": 2, "data": 0.5}, {"steps": 2, "data": "builtin:tiny-random", "grow": ["depth:text:1"]}]})
    result = train(model, "builtin:tiny-random", first, data_config=data)
    # Stage 2 keeps stage 1's half (16 pairs) and adds the 32 pairs of the new source.
    assert [s["pairs"] for s in result.stages] == [16, 48]
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "first" / "model")
    assert [r["op"] for r in loaded.growth] == ["depth:text:1"] and loaded.growth[0]["stage"] == 2
    # A new run over the loaded model: its stage 2 must grow although the loaded history has a stage-2 record.
    second = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "second"), "steps": 4, "batch_size": 8, "report_to": [], "warmup_steps": 1,
        "growth": [{"steps": 2, "data": 0.5}, {"steps": 2, "data": 1.0, "grow": ["depth:text:1"]}]})
    result = train(loaded, "builtin:tiny-random", second, data_config=data)
    assert [r["op"] for r in loaded.growth] == ["depth:text:1", "depth:text:1"]
    assert result.stages[1]["growth"] == ["depth:text:1"] and len(loaded.text.extra_blocks) == 2
