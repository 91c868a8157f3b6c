"""Faults a run survives or stops on cleanly: NaN batches, diverging updates, bad data, torn saves, dead launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lilt
import lilt.checkpoint
from lilt.config import DataConfig, TrainConfig
from lilt.data.transforms import PairCollator
from lilt.finite import updating_bn_buffers
from lilt.training import train

DEEP_CNN = lilt.TuningPlan([{"tower": "vision", "method": "deep"}, {"tower": "text", "method": "layernorm"}])


def quick(tmp_path: Path, **options) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path / "out"), "steps": 8, "batch_size": 8, "report_to": [],
                          "resume": "never", "warmup_steps": 1, "lr": 1e-3, **options})


def tiny_data(**options) -> DataConfig:
    return DataConfig(**{"source": "builtin:tiny-random", "num_workers": 0, "options": {"n": 32}, **options})


def test_a_nan_batch_on_a_cnn_with_updating_batchnorm_is_undone(make_model, tmp_path, monkeypatch) -> None:
    model = make_model("cnn")
    lilt.apply_plan(model, DEEP_CNN)
    model.train()
    assert updating_bn_buffers(model), "the appended CNN block's BatchNorm should update in training"
    calls = {"n": 0}
    collate = PairCollator.__call__

    def poisoned(self, items):
        batch = collate(self, items)
        calls["n"] += 1
        if calls["n"] == 3 and "pixel_values" in batch:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    monkeypatch.setattr(PairCollator, "__call__", poisoned)
    result = train(model, tiny_data(), quick(tmp_path, save_every=4))
    assert result.nonfinite_steps == 1 and result.steps == 8
    for name, value in updating_bn_buffers(model).items():
        assert torch.isfinite(value.float()).all(), name
    for folder in [tmp_path / "out" / "model", *lilt.checkpoint.checkpoint_dirs(tmp_path / "out")]:
        for name, tensor in load_file(folder / "model.safetensors").items():
            assert torch.isfinite(tensor.float()).all(), f"{folder}: {name}"
    metrics = lilt.evaluate_retrieval(model, lilt.load_pairs("builtin:tiny-random", "validation", n=32))
    assert metrics["all"]["t2i/R@1"] < 100.0


def test_an_update_that_diverges_stops_the_run_before_anything_is_saved(make_model, tmp_path, monkeypatch) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    step = torch.optim.AdamW.step

    def diverging(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] == 5:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)
    with pytest.raises(lilt.NonFiniteError, match=r"step 5: .* holds NaN or infinity"):
        train(model, tiny_data(), quick(tmp_path, save_every=2))
    saved = lilt.checkpoint.checkpoint_dirs(tmp_path / "out")
    assert [p.name for p in saved] == ["step-2", "step-4"] and not (tmp_path / "out" / "model").exists()
    assert lilt.checkpoint.latest_checkpoint(tmp_path / "out").name == "step-4"


def test_non_finite_knobs_are_config_errors() -> None:
    for knob, value in (("lr", float("inf")), ("lr", float("nan")), ("max_grad_norm", float("nan")),
                        ("weight_decay", -0.1), ("betas", [0.9, 1.5]), ("lr", 11.0), ("seed", -1)):
        with pytest.raises(lilt.ConfigError, match=knob):
            TrainConfig(**{knob: value})
    with pytest.raises(lilt.ConfigError, match="pairs_per_lang.*negative"):
        DataConfig(pairs_per_lang={"sw": -5})
    with pytest.raises(lilt.ConfigError, match=r"\[1, 64\]"):
        lilt.GrowthOp.parse("depth:text:100000")


def test_evaluation_refuses_nan_embeddings(make_model) -> None:
    model = make_model("vit")
    with torch.no_grad():
        model.text_proj.weight.fill_(float("nan"))
    data = lilt.load_pairs("builtin:tiny-random", "validation", n=16)
    with pytest.raises(lilt.NonFiniteError, match="caption embeddings"):
        lilt.evaluate_retrieval(model, data)


def test_bad_items_stop_a_run_shorter_than_an_epoch(make_model, tmp_path, monkeypatch) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    collate = PairCollator.__call__

    def spoiled(self, items):  # every third item unreadable: 33%, far over max_bad_fraction
        items = [{**item, "image": b"not an image"} if item["__row__"] % 3 == 0 else item for item in items]
        return collate(self, items)

    monkeypatch.setattr(PairCollator, "__call__", spoiled)
    with pytest.raises(lilt.DataError, match=r"in the last 16 items|partial epoch"):
        train(model, tiny_data(bad_window=16, options={"n": 256}), quick(tmp_path, steps=3))


def test_a_failed_save_leaves_the_previous_checkpoint_whole(make_model, tmp_path, monkeypatch) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    model.save_pretrained(tmp_path / "ckpt")
    before = load_file(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "README.md").write_text("my notes")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    monkeypatch.setattr(lilt._io, "write_json", broken)
    monkeypatch.setattr(lilt.checkpoint, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.vision_proj.weight, before["vision_proj.weight"])
    assert (tmp_path / "ckpt" / "README.md").read_text() == "my notes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    model.save_pretrained(tmp_path / "ckpt")  # and a later save keeps the user's file
    assert (tmp_path / "ckpt" / "README.md").read_text() == "my notes"


def test_resume_skips_damaged_or_incomplete_checkpoints(make_model, tmp_path) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}]))
    train(model, tiny_data(), quick(tmp_path, save_every=2, keep_checkpoints=5))
    out = tmp_path / "out"
    assert [p.name for p in lilt.checkpoint.checkpoint_dirs(out)][-2:] == ["step-6", "step-8"]
    state = out / "checkpoints" / "step-8" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 999}))  # edited
    (out / "checkpoints" / "step-6" / "optimizer.safetensors").write_bytes(b"")  # damaged
    (out / "checkpoints" / "step-10").mkdir()  # a newer, incomplete folder
    assert lilt.checkpoint.latest_checkpoint(out).name == "step-4"
    for name in ("step-2", "step-4"):
        (out / "checkpoints" / name / "rng_0.json").unlink()
    with pytest.raises(lilt.CheckpointError, match="no usable checkpoint.*resume=never"):
        lilt.checkpoint.latest_checkpoint(out)


WORKER = r'''
import os, subprocess, sys, time
if sys.argv[1] == "launcher":
    child = subprocess.Popen([sys.executable, __file__, "worker"], env={**os.environ, "LOCAL_RANK": "0"})
    print(child.pid, flush=True)
    time.sleep(120)
else:
    from lilt.supervise import exit_with_parent
    assert exit_with_parent()
    time.sleep(120)
'''


def test_a_worker_exits_when_its_launcher_is_killed(tmp_path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(WORKER)
    launcher = subprocess.Popen([sys.executable, str(script), "launcher"], stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    time.sleep(2.0)  # let the worker arm its death signal
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{worker}/stat").is_file() and Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z":
            return  # a zombie: it exited, and waits for its new parent to reap it
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its launcher by 10 s")
