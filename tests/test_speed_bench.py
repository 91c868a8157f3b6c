"""benchmarks/speed.py: open_clip gets lilt's towers and trainable sets, the report's checks, a smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of scripts at the repository root, not an installed package
from benchmarks import _speed_runs as speed_runs, speed  # noqa: E402
from benchmarks._speed_report import report  # noqa: E402
from benchmarks._speed_runs import CONFIGS, Spec, lilt_model, lilt_step_parts, open_clip_model  # noqa: E402

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_open_clip = pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip is not installed (pip install 'lilt[bench]')")


def _spec(tiny_dirs: dict[str, Path], config: str, builder: str = "lilt") -> Spec:
    return Spec(config=config, builder=builder, vision=str(tiny_dirs["cnn"]), text=str(tiny_dirs["bert"]),
                image_size=32, tokens=8, batch_size=4, steps=1, warmup=1, threads=1, device="cpu", embed_dim=16)


def _trainable(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes))


@needs_open_clip
@pytest.mark.parametrize("config", [c for c, (_, oc) in CONFIGS.items() if oc])
def test_open_clip_trains_the_same_tower_parameters(tiny_dirs: dict[str, Path], config: str) -> None:
    """Per tower, open_clip's flags (and hand patches) train exactly as many parameters as lilt's plan."""
    spec = _spec(tiny_dirs, config)
    lilt = lilt_model(spec, CONFIGS[config][0]())
    oc, _ = open_clip_model(spec, CONFIGS[config][1])
    assert _trainable(oc, ("visual.trunk.",)) == _trainable(lilt, ("vision.",))
    assert _trainable(oc, ("text.transformer.",)) == _trainable(lilt, ("text.",))
    # Heads: lilt's projections have a bias (ModelConfig.head_bias), open_clip's do not.
    assert _trainable(lilt, ("vision_proj.", "text_proj.", "logit_")) == \
        _trainable(oc, ("visual.head.", "text.proj.", "logit_")) + 2 * spec.embed_dim
    if config == "full":
        assert _trainable(oc, ("visual.trunk.",)) == sum(p.numel() for p in oc.visual.trunk.parameters())


@needs_open_clip
def test_open_clip_runs_the_same_towers(tiny_dirs: dict[str, Path]) -> None:
    """The copied weights and the pooling give lilt's pooled tower features (eval mode)."""
    spec = _spec(tiny_dirs, "heads")
    lilt = lilt_model(spec, CONFIGS["heads"][0]()).eval()
    oc, _ = open_clip_model(spec, "heads")
    oc.eval()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 30, (2, 8))
    with torch.no_grad():
        assert torch.allclose(oc.visual.trunk(images), lilt.vision(images), atol=1e-5)
        out = oc.text.transformer(input_ids=ids, attention_mask=torch.ones_like(ids))
        pooled = oc.text.pooler(out, torch.ones_like(ids))
        assert torch.allclose(pooled, lilt.text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
                              atol=1e-5)


def _run(config: str, builder: str, round_index: int, sps: float, rss: float) -> dict:
    return {"config": config, "builder": builder, "round": round_index, "samples_per_s": sps, "peak_rss_mib": rss,
            "split_s": {"forward": 0.5, "backward": 1.0, "optimizer": 0.25}, "nograd_samples_per_s": 3 * sps,
            "percent": 1.0, "trainable": 10, "notes": ["patched"] if builder == "open_clip" else []}


def test_report_medians_ratios_and_checks(tmp_path: Path) -> None:
    runs = [_run("full", "open_clip", r, s, 3000) for r, s in enumerate((9.0, 10.0, 11.0))]
    runs += [_run("full", "lilt", r, s, 2000) for r, s in enumerate((10.0, 12.0, 14.0))]
    runs += [_run("layernorm", "open_clip", r, 10.0, 2500) for r in range(3)]
    runs += [_run("layernorm", "lilt", r, 14.0, 900) for r in range(3)]  # 1.4x open_clip: fails 1.5x
    runs += [_run("lwa", "lilt", r, 20.0, 1100) for r in range(3)]  # 1.67x full, RSS 0.55x full
    runs += [{**_run("e2e-open_clip-heads", "open_clip", r, 10.0, 1500), "wall_s": 60.0} for r in range(3)]
    runs += [{**_run("e2e-heads-cache", "lilt", r, 80.0, 1000), "wall_s": 8.0} for r in range(3)]
    meta = {"device_name": "CPU (2 threads) test", "vision": "v", "text": "t", "batch_size": 32, "image_size": 224,
            "tokens": 32, "steps": 10, "warmup": 2, "rounds": 3, "epochs": 5, "pairs": 1226, "num_workers": 2}
    stem = tmp_path / "speed_cpu"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}))
    text = report(stem)
    assert "| full | 1.000 / 1.000 | 10.0 | 12.0 (10.0, 12.0, 14.0) | 1.20x | 1.00x | 2000 (1.00) |" in text
    assert "| layernorm vs open_clip's same set | 1.40x | >= 1.5x | **fail** |" in text
    assert "| lwa vs lilt full | 1.67x | >= 1.6x | pass |" in text
    assert "| lwa peak RSS vs lilt full | 0.55x | <= 0.5x | **fail** |" in text
    assert "| layernorm peak RSS vs lilt full | 0.45x | <= 0.5x | pass |" in text
    assert "| e2e-heads-cache end to end vs open_clip heads-only end to end | 8.00x | >= 5.0x | pass |" in text
    assert "| lora vs lilt full | - | >= 1.6x | not measured |" in text
    assert "By hand: patched." in text
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["summary"]["full"]["vs_open_clip"] == pytest.approx(1.2)
    assert stem.with_suffix(".md").read_text() == text and stem.with_suffix(".png").stat().st_size > 1000


def test_cuda_report_judges_memory_by_the_gpu_peak(tmp_path: Path) -> None:
    """On CUDA the memory column and checks read the GPU's peak allocation, not the interpreter's host RSS."""
    runs = [{**_run("full", "lilt", 0, 10.0, 2000), "cuda_peak_mib": 10000.0},
            {**_run("lwa", "lilt", 0, 10.0, 2000), "cuda_peak_mib": 4000.0}]
    meta = {"device_name": "GPU test", "device": "cuda", "vision": "v", "text": "t", "batch_size": 128,
            "image_size": 224, "tokens": 32, "steps": 10, "warmup": 2, "rounds": 1, "epochs": 5, "num_workers": 2,
            "note": "round 2 cut short"}
    stem = tmp_path / "speed_cuda"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}))
    text = report(stem)
    assert "lilt peak GPU MiB (/ full)" in text and "round 2 cut short." in text
    assert "| lwa | 1.000 / - | - | 10.0 (10.0) | - | 1.00x | 4000 (0.40) |" in text
    assert "| lwa peak GPU memory vs lilt full | 0.40x | <= 0.5x | pass |" in text


def test_configs_and_rounds_interleave() -> None:
    assert speed.plan_runs(["full", "lwa", "e2e-heads-cache", "e2e-open_clip-heads"], open_clip=True) == [
        ("full", "open_clip"), ("full", "lilt"), ("lwa", "lilt"), ("e2e-heads-cache", "lilt"),
        ("e2e-open_clip-heads", "open_clip")]
    assert speed.plan_runs(["full", "e2e-open_clip-heads"], open_clip=False) == [("full", "lilt")]
    assert speed.choose("lwa,full") == ["full", "lwa"]
    with pytest.raises(SystemExit, match="unknown configs \\['fulll'\\]"):
        speed.choose("fulll")
    with pytest.raises(SystemExit, match="its own --results"):
        speed.parse(["--smoke-towers", "a", "b"])


def test_a_prepared_pairs_table_is_read_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    """--pairs DIR holding a table (carried to a machine without the emoji fonts) is used as it is."""
    from datasets import Dataset

    Dataset.from_dict({"image": [b"x"] * 3, "text": ["a", "b", "c"], "lang": ["en"] * 3}).save_to_disk(
        str(tmp_path / "pairs"))
    monkeypatch.setattr(speed, "prepare_pairs", lambda *a: pytest.fail("prepared again"))
    assert speed.pairs_table(tmp_path / "pairs", None) == 3
    monkeypatch.setattr(speed, "prepare_pairs", lambda folder, max_pairs: 7)
    assert speed.pairs_table(tmp_path / "absent", 64) == 7


def test_pairs_that_are_not_a_table_get_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """--pairs naming a file, or a folder holding something else, is refused before anything is written."""
    monkeypatch.setattr(speed, "prepare_pairs", lambda *a: pytest.fail("would write into it"))
    (tmp_path / "pairs.csv").write_text("image,text\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    for bad in (tmp_path / "pairs.csv", tmp_path / "photos"):
        with pytest.raises(SystemExit, match="is not a pairs table"):
            speed.pairs_table(bad, None)
    assert (tmp_path / "pairs.csv").read_text() == "image,text\n"
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(speed, "prepare_pairs", lambda folder, max_pairs: 5)
    assert speed.pairs_table(tmp_path / "empty", None) == 5


def _smoke(tiny_dirs: dict[str, Path], results: Path, configs: str) -> list[str]:
    return ["--smoke-towers", str(tiny_dirs["cnn"]), str(tiny_dirs["bert"]), "--results", str(results),
            "--configs", configs, "--rounds", "2", "--steps", "1", "--warmup", "1", "--epochs", "1", "--threads", "1",
            "--num-workers", "0"]


@pytest.mark.slow
def test_smoke_run_lilt_alone(tmp_path: Path, tiny_dirs: dict[str, Path], monkeypatch, capsys) -> None:
    """Without open_clip the lilt rows still run, each in its own process, and the report says what is missing."""
    monkeypatch.setattr(speed, "has_open_clip", lambda: False)
    assert speed.main(_smoke(tiny_dirs, tmp_path, "full,lwa,e2e-heads-cache,e2e-open_clip-heads")) == 0
    assert "open_clip is not installed" in capsys.readouterr().out
    data = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert sorted((r["config"], r["round"]) for r in data["runs"]) == [
        (c, r) for c in ("e2e-heads-cache", "full", "lwa") for r in (0, 1)]
    assert all(r["builder"] == "lilt" and r["samples_per_s"] > 0 and r["peak_rss_mib"] > 50 for r in data["runs"])
    e2e = [r for r in data["runs"] if r["config"] == "e2e-heads-cache"]
    assert all(r["cache_files"] and r["steps"] == 64 // 8 for r in e2e)  # 64 pairs, batch 8, 1 epoch, cache filled
    assert data["summary"]["lwa"]["vs_full"] > 0
    assert "| lwa vs lilt full |" in (tmp_path / "speed_cpu.md").read_text()


@needs_open_clip
@pytest.mark.slow
def test_smoke_run_side_by_side(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    assert speed.main(_smoke(tiny_dirs, tmp_path, "layernorm,e2e-open_clip-heads")) == 0
    data = json.loads((tmp_path / "speed_cpu.json").read_text())
    # Round 1 runs open_clip first, round 2 lilt first.
    assert [(r["config"], r["builder"], r["round"]) for r in data["runs"]] == [
        ("layernorm", "open_clip", 0), ("layernorm", "lilt", 0), ("e2e-open_clip-heads", "open_clip", 0),
        ("layernorm", "lilt", 1), ("layernorm", "open_clip", 1), ("e2e-open_clip-heads", "open_clip", 1)]
    layernorm = data["summary"]["layernorm"]
    assert layernorm["vs_open_clip"] > 0 and layernorm["open_clip"]["split_s"]["backward"] > 0
    assert layernorm["lilt"]["percent"] > layernorm["open_clip"]["percent"] > 0  # lilt's heads have a bias
    assert any("by hand" in n for n in layernorm["open_clip"]["notes"])
    e2e = data["summary"]["e2e-open_clip-heads"]["open_clip"]
    assert e2e["samples_per_s"] > 0 and e2e["trainable"] == 32 * 16 + 256 * 16 + 1  # text and vision heads, scale


def test_checkpointed_rows_train_the_same_plan_with_gradient_checkpointing(tiny_dirs: dict[str, Path]) -> None:
    def towers(config: str) -> list[bool]:
        spec = Spec(config, "lilt", str(tiny_dirs["cnn"]), str(tiny_dirs["bert"]), image_size=32, tokens=8,
                    batch_size=2, steps=1, warmup=0, threads=1, device="cpu")
        model = lilt_step_parts(spec)[0]
        return [model.vision.gradient_checkpointing, model.text.gradient_checkpointing]

    assert towers("lwa-ckpt") == towers("lwa-ckpt-bf16") == [True, True] and towers("lwa") == [False, False]
    assert CONFIGS["lwa-ckpt"][1] is None  # open_clip has no such row to stand beside it


def test_bf16_rows_train_the_same_plan_under_bf16_autocast(tiny_dirs: dict[str, Path]) -> None:
    def dtypes(config: str) -> set[torch.dtype]:
        spec = Spec(config, "lilt", str(tiny_dirs["cnn"]), str(tiny_dirs["bert"]), image_size=32, tokens=8,
                    batch_size=2, steps=1, warmup=0, threads=1, device="cpu")
        model, forward, _, _ = lilt_step_parts(spec)
        seen: set[torch.dtype] = set()
        hook = model.text_proj.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
        loss = forward(torch.randn(2, 3, 32, 32), torch.randint(5, model.text.backbone.config.vocab_size, (2, 8)))
        hook.remove()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the softmax over the batch stays fp32
        return seen

    assert dtypes("lwa-bf16") == dtypes("lwa-ckpt-bf16") == {torch.bfloat16} and dtypes("lwa") == {torch.float32}
    assert CONFIGS["lwa-bf16"][0]().rules == CONFIGS["lwa"][0]().rules and CONFIGS["lwa-bf16"][1] is None


def test_fw_rows_store_the_frozen_weights_in_bf16_while_the_steps_run(tiny_dirs: dict[str, Path], monkeypatch) -> None:
    seen: list[set[torch.dtype]] = []
    timed = speed_runs._time_steps

    def spy(spec, forward, optimizer, images, ids, times):  # what the timed steps hold, then run them
        seen.append({p.dtype for p in built[-1].parameters() if not p.requires_grad})
        return timed(spec, forward, optimizer, images, ids, times)

    built: list[torch.nn.Module] = []
    parts = speed_runs.lilt_step_parts
    monkeypatch.setattr(speed_runs, "lilt_step_parts", lambda spec: (lambda out: built.append(out[0]) or out)(
        parts(spec)))
    monkeypatch.setattr(speed_runs, "_time_steps", spy)
    for config in ("lwa-bf16", "lwa-bf16-fw"):
        spec = Spec(config, "lilt", str(tiny_dirs["cnn"]), str(tiny_dirs["bert"]), image_size=32, tokens=8,
                    batch_size=2, steps=1, warmup=0, threads=1, device="cpu")
        assert speed_runs.measure_steps(spec)["samples_per_s"] > 0
    assert seen[0] == {torch.float32} and torch.bfloat16 in seen[1]
    assert {p.dtype for p in built[1].parameters()} == {torch.float32}  # the exact weights back after the steps
    assert CONFIGS["lwa-bf16-fw"][0]().rules == CONFIGS["lwa"][0]().rules


def test_floor_rows_train_the_bottom_blocks_norms_alone_through_every_block(tiny_dirs: dict[str, Path]) -> None:
    for config, dtype in (("floor", torch.float32), ("floor-bf16-fw", torch.bfloat16)):
        spec = Spec(config, "lilt", str(tiny_dirs["cnn"]), str(tiny_dirs["bert"]), image_size=32, tokens=8,
                    batch_size=2, steps=1, warmup=0, threads=1, device="cpu")
        model, forward, _, _ = lilt_step_parts(spec)
        for tower in (model.vision, model.text):
            first, rest = tower.block_names()[0], tower.block_names()[1:]
            inside = [n for n, p in tower.named_parameters() if p.requires_grad]
            assert inside and all(n.startswith(first + ".") for n in inside)  # the bottom block's, nothing above
            assert not any(n.startswith(b + ".") for n in inside for b in rest)
        loss = forward(torch.randn(2, 3, 32, 32), torch.randint(5, model.text.backbone.config.vocab_size, (2, 8)))
        loss.backward()  # reaches the bottom blocks: every frozen block above passes the input gradient down
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        assert (config in speed_runs.LOW_FROZEN) == (dtype == torch.bfloat16)
    assert CONFIGS["floor"][1] is None
