"""The training loop: exact accumulation, 2 processes vs 1, resume, bad data, non-finite losses, checkpointing."""

from __future__ import annotations

import copy
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lilt
from lilt.config import DataConfig, DataError, TrainConfig
from lilt.losses import clip_loss
from lilt.gradcache import grad_cache_backward
from lilt.training import train

from helpers import (LWA, NO_DROPOUT, REPO, lilt_train, losses, max_difference, sample_batch, weights,
                     write_imagefolder)


def test_grad_cache_gives_the_full_batch_gradient(make_model) -> None:
    from accelerate import Accelerator

    model = make_model("vit", text_options=NO_DROPOUT)
    lilt.apply_plan(model, LWA)
    model.double()  # float64, so that "equal" means equal and not "within float32 summation-order noise"
    size = model.vision.data_config["input_size"][-1]
    inputs = {"pixel_values": torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)).double(),
              **model.tokenize([f"caption {w} number {i}" for i, w in enumerate("abcdefgh")])}
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move off the zero-initialized adapters so that every tensor gets a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    out = model(**inputs)
    clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    full = [p.grad.clone() for p in params]
    model.zero_grad()
    loss_fn = lambda i, t, s, b: clip_loss(i, t, s)  # noqa: E731
    loss = grad_cache_backward(model, model, inputs, 4, loss_fn, Accelerator(cpu=True))
    full_loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale).detach()
    assert loss == pytest.approx(float(full_loss), rel=1e-9)
    worst = max(float((p.grad - f).norm() / f.norm().clamp_min(1e-12)) for p, f in zip(params, full))
    assert worst < 1e-5
    assert all(f.abs().sum() > 0 for f in full)  # every trainable tensor really got a gradient


@pytest.mark.parametrize("overrides", [(), ("train.accumulation_steps=2",)], ids=["global-negatives", "gradcache"])
def test_two_processes_match_one_process_on_the_same_global_batch(recipe: Path, tmp_path: Path, overrides) -> None:
    lilt_train(recipe, tmp_path / "one", *overrides)
    lilt_train(recipe, tmp_path / "two", *overrides, processes=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    assert losses(tmp_path / "one")[0] > losses(tmp_path / "one")[-1]  # it trained
    # The loss at step 1 scores 8 pairs against each other (7 negatives), not 4 per process: ln(8) ~ 2.08.
    assert losses(tmp_path / "two")[0] == pytest.approx(2.08, abs=0.1)


def test_sigkill_and_resume_ends_with_the_same_weights(recipe: Path, tmp_path: Path) -> None:
    overrides = ("train.steps=120", "train.save_every=20", "train.log_every=10", "data.options.n=48")
    lilt_train(recipe, tmp_path / "straight", *overrides)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lilt.cli", "train", "--recipe", str(recipe), "--output-dir", str(out), *overrides]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-20" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists(), "the run finished before it was killed; the test proves nothing"
    lilt_train(recipe, out, *overrides)
    assert json.loads((out / "checkpoints" / "step-120" / "trainer_state.json").read_text())["step"] == 120
    assert max_difference(weights(tmp_path / "straight"), weights(out)) < 1e-6
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_checkpoints


def tiny_model(make_model) -> lilt.DualEncoder:
    model = make_model("vit", text_options=NO_DROPOUT)
    lilt.apply_plan(model, LWA)
    return model


def test_a_few_corrupt_images_are_skipped_and_counted(make_model, tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "f", 100, corrupt=3)
    config = TrainConfig(output_dir=str(tmp_path / "out"), steps=12, batch_size=16, report_to=[], resume="never")
    data = DataConfig(source=str(folder), text_column="caption", num_workers=0, max_bad_fraction=0.05)
    result = train(tiny_model(make_model), data, config)
    assert result.steps == 12
    assert result.bad_items == 6  # 3 per epoch, 2 epochs (6 batches of 16 per epoch)


def test_too_many_corrupt_images_stop_with_the_documented_error(make_model, tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "f", 40, corrupt=12)
    config = TrainConfig(output_dir=str(tmp_path / "out"), steps=20, batch_size=8, report_to=[], resume="never")
    data = DataConfig(source=str(folder), text_column="caption", num_workers=0)
    with pytest.raises(DataError, match=r"12 of 40 items \(30.0%\).*max_bad_fraction=0.01.*img0\d\d.png"):
        train(tiny_model(make_model), data, config)


def test_non_finite_losses_are_skipped_then_stop_the_run(make_model, tmp_path: Path, monkeypatch) -> None:
    import lilt.training as train_module

    model = tiny_model(make_model)
    before = {k: v.clone() for k, v in model.delta_state_dict().items()}
    nan_loss = lambda i, t, s, b: (i * t).sum() * float("nan")  # noqa: E731
    monkeypatch.setattr(train_module, "contrastive_loss", lambda config: nan_loss)
    config = TrainConfig(output_dir=str(tmp_path / "out"), steps=10, batch_size=8, report_to=[], resume="never",
                         max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        train(model, "builtin:tiny-random", config, data_config=DataConfig(num_workers=0))
    assert max_difference(before, model.delta_state_dict()) == 0.0


def _loss_and_gradients(model: lilt.DualEncoder, images: torch.Tensor,
                        text: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], int]:
    """One seeded forward and backward: the loss, every trainable gradient, and the bytes autograd kept."""
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += 0 if isinstance(tensor, torch.nn.Parameter) else tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images, **text)
    loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, kept


@pytest.mark.parametrize("vision", ["vit", "cnn"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(make_model, vision) -> None:
    model = make_model(vision)  # the text tower's dropout is on: the recomputation must replay its masks
    lilt.apply_plan(model, LWA)
    model.train()
    with torch.no_grad():  # off the zero-initialized adapters, so that every tensor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images, text = sample_batch(model, 4)
    loss, grads, kept = _loss_and_gradients(model, images, text)
    model.set_gradient_checkpointing(True)
    loss_ckpt, grads_ckpt, kept_ckpt = _loss_and_gradients(model, images, text)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    worst = max(float((grads_ckpt[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in grads.items())
    assert worst < 1e-5
    assert all(g.abs().sum() > 0 for g in grads.values())
    # The blocks' activations were not kept but recomputed: 0.14x (ViT) and 0.51x (the tiny CNN, whose lean
    # BatchNorms already keep one tensor per layer, and whose stage inputs are a large share) of what lilt.lean keeps.
    assert kept_ckpt < 0.6 * kept, (kept_ckpt, kept)


def test_gradient_checkpointing_leaves_moving_batchnorm_statistics_alone(make_model) -> None:
    # Statistics that a forward pass updates would move twice if their block ran again in the backward pass.
    model = make_model("cnn", vision_options={"image_size": 32, "freeze_bn_stats": False})
    lilt.apply_plan(model, LWA)
    model.train()
    images, text = sample_batch(model, 4)
    twin = copy.deepcopy(model)
    twin.set_gradient_checkpointing(True)
    for m in (model, twin):
        _loss_and_gradients(m, images, text)
    stats = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "num_batches_tracked"))}
    assert stats and int(stats[next(k for k in stats if k.endswith("num_batches_tracked"))]) == 1
    assert max_difference(stats, {k: twin.state_dict()[k] for k in stats}) == 0.0


def test_gradient_checkpointing_trains_and_resumes_like_a_plain_run(make_model, tmp_path: Path) -> None:
    data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 32})

    def run(out: str, checkpointing: bool, resume: str = "never") -> dict[str, torch.Tensor]:
        config = TrainConfig(output_dir=str(tmp_path / out), steps=6, save_every=3, batch_size=8, log_every=1,
                             report_to=[], warmup_steps=2, lr=1e-3, resume=resume,
                             gradient_checkpointing=checkpointing)
        model = make_model("cnn")  # dropout on in the text tower
        lilt.apply_plan(model, LWA)
        train(model, data_config=data, config=config)
        return weights(tmp_path / out)

    plain = run("plain", False)
    assert max_difference(plain, run("checkpointed", True)) < 1e-5
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "checkpointed"), abs=1e-5)
    resumed = run("resumed", True, resume=str(tmp_path / "plain" / "checkpoints" / "step-3"))
    assert max_difference(plain, resumed) < 1e-5


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_cpu_training_keeps_freed_memory_for_reuse_and_returns_it_after() -> None:
    import numpy as np

    from lilt.cpu_memory import reuse_freed_memory

    with reuse_freed_memory(False) as active:
        assert not active
    with reuse_freed_memory() as active:
        assert active
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB: glibc would mmap it and unmap it on free
        held = _resident_mib()
        del block
        assert _resident_mib() > held - 16  # freed, but kept: the next step reuses these pages
    assert _resident_mib() < held - 48  # after training the memory goes back to the system


# Whether glibc maps a block depends on its heap too (a free chunk that fits is used first), so the malloc checks run
# in a fresh interpreter, whose small heap makes mmap follow the thresholds alone. mallinfo2().hblkhd: mapped bytes.
_MALLOC_PROBE = """
import ctypes, json
from lilt import cpu_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped(mib):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(mib * 2**20)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grown // 2**20

libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD at glibc's start, as in a process that freed no large block
out = {"before": mapped(4)}
with cpu_memory.reuse_freed_memory():
    with cpu_memory.reuse_freed_memory():
        pass
    out["nested"] = [cpu_memory.reusing(), mapped(256)]  # the outer block's settings hold: nothing is mapped
out["after"] = [cpu_memory.reusing(), mapped(4), mapped(16), mapped(64)]
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_reuse_nests_and_after_training_malloc_maps_only_blocks_above_the_settled_threshold() -> None:
    """A validation pass inside training keeps training's settings; after training glibc maps blocks from its
    settled threshold (32 MiB) on, not from the 128 KB its dynamic threshold, now off for good, started at."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33)")
    proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["before"] >= 4  # glibc's start: a 4 MiB block gets its own mapping
    assert out["nested"] == [True, 0]
    assert out["after"] == [False, 0, 0, 64]  # 4 and 16 MiB from the heap, reused; 64 MiB mapped


def test_embedding_passes_keep_freed_memory_unless_turned_off(monkeypatch) -> None:
    """Embedding passes over a table (evaluation, frozen features) run in a reuse block; LILT_REUSE_CPU_MEMORY=0
    turns it off."""
    from lilt import cpu_memory
    from lilt.eval.retrieval import embed_texts

    seen = []

    class Model:
        device = torch.device("cpu")

        def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long)}

        def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
            seen.append(cpu_memory.reusing())
            return torch.ones(len(tokens["input_ids"]), 4)

    assert embed_texts(Model(), ["a", "b"]).shape == (2, 4)
    assert seen == [sys.platform.startswith("linux")]
    monkeypatch.setenv("LILT_REUSE_CPU_MEMORY", "0")
    embed_texts(Model(), ["a"])
    assert seen[-1] is False


def test_the_optimizer_is_torch_adamw_with_its_fused_kernel_on_a_cpu() -> None:
    from lilt.optim import adamw

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = adamw([{"params": params, "weight_decay": 0.1}], 1e-2, (0.9, 0.999))
    loop = torch.optim.AdamW([{"params": twins, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.999))
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0]["fused"]
    for _ in range(3):
        for a, b in zip(params, twins):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b)
