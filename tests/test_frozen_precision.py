"""Frozen weights stored in bf16 while training under bf16 autocast: same layer outputs, exact fp32 afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lilt
from lilt.config import ConfigError, DataConfig, TrainConfig
from lilt.frozen_precision import _file_maps, frozen_weights_in, native_bf16
from lilt.training import reset_accelerate_state, train

from helpers import LWA, NO_DROPOUT, embeddings, sample_batch, weights


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one precision per process: a bf16 run here must not make later 'auto' runs bf16."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("vision", ["vit", "cnn"])
def test_frozen_weights_are_bf16_inside_and_exact_fp32_after(make_model, vision: str) -> None:
    model = make_model(vision, text_options=NO_DROPOUT)
    lilt.apply_plan(model, LWA)
    if sys.platform.startswith("linux"):  # loaded from safetensors: the weights are views of the file's map
        assert _file_maps({p.untyped_storage().data_ptr() for p in model.parameters()})
    before, trainable = _frozen(model), {n: p for n, p in model.named_parameters() if p.requires_grad}
    images, text = sample_batch(model)
    with torch.autocast("cpu", torch.bfloat16):
        image_ref, text_ref = embeddings(model, images, text)
    plain_image, plain_text = embeddings(model, images, text)
    hooks = [len(m._forward_hooks) for m in model.modules()]
    loaded_maps = _file_maps({p.untyped_storage().data_ptr() for p in model.parameters()})
    with frozen_weights_in(model, torch.bfloat16) as swapped:
        low = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
        layers = {f"{name}.weight": m for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and not m.weight.requires_grad}
        tables = {n for n, m in layers.items() if isinstance(m, nn.Embedding)}
        assert swapped == len(layers) > 0 and low == set(layers) - tables and tables
        assert all(p.dtype == torch.float32 for p in trainable.values())  # adapters, norms, heads: untouched
        if sys.platform.startswith("linux"):
            kept = [*model.parameters(), *model.buffers()]
            # no tensor keeps the loaded file's memory map (and its fp32 pages) ...
            assert not set(_file_maps({t.untyped_storage().data_ptr() for t in kept})) & set(loaded_maps)
            # ... and the embedding tables, fp32, view the saved file's map: pages come in as rows are looked up
            on_map = {n for n, p in model.named_parameters() if _file_maps({p.untyped_storage().data_ptr()})}
            assert on_map == tables
        assert all(layers[n].weight.dtype == torch.float32 for n in tables)
        with torch.autocast("cpu", torch.bfloat16):
            image_low, text_low = embeddings(model, images, text)
        # Linear and convolutions compute in bf16 under autocast anyway and the embedding tables keep their fp32
        # values: both towers give the same bits.
        assert torch.equal(image_low, image_ref) and torch.equal(text_low, text_ref)
        assert text_low.dtype == text_ref.dtype
        fp32_image, fp32_text = embeddings(model, images, text)  # without autocast (validation during training)
        assert fp32_image.dtype == torch.float32
        assert torch.allclose(fp32_image, plain_image, atol=0.05) and torch.allclose(fp32_text, plain_text, atol=0.05)
        # a training step: gradients reach every trainable tensor, in fp32
        model.train()
        with torch.autocast("cpu", torch.bfloat16):
            out = model(pixel_values=images, **text)
        (out.image_embeds.float() @ out.text_embeds.float().t()).trace().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in trainable.items()
                   if "logit" not in n)
    after = _frozen(model)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in before)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [len(m._forward_hooks) for m in model.modules()] == hooks  # its output casts are removed
    again_image, again_text = embeddings(model, images, text)
    assert torch.equal(again_image, plain_image) and torch.equal(again_text, plain_text)


def test_native_bf16_reads_the_cpu_instructions(monkeypatch) -> None:
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16("cpu") is native
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16("cpu")  # a torch without the checks: no claim either way, so no warning


@pytest.mark.parametrize("native", [False, True])
def test_train_with_bf16_frozen_weights_restores_them_and_trains(make_model, tmp_path: Path, monkeypatch, caplog,
                                                                 native: bool) -> None:
    monkeypatch.setattr("lilt.training.native_bf16", lambda device: native)
    model = make_model("cnn", text_options=NO_DROPOUT)
    lilt.apply_plan(model, LWA)
    before = _frozen(model)
    data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 32})
    config = TrainConfig(output_dir=str(tmp_path / "low"), steps=4, batch_size=8, report_to=[], warmup_steps=1,
                         lr=1e-3, mixed_precision="bf16", frozen_dtype="bfloat16", eval_every=2)
    with caplog.at_level("WARNING", logger="lilt.training"):
        result = train(model, data_config=data, config=config, val_data=lilt.load_pairs(
            "builtin:tiny-random:validation"))
    slow = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(slow) == (0 if native else 1) and all("train.mixed_precision=no" in m for m in slow)
    after = _frozen(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert result.metrics  # validation ran inside the block, without autocast
    saved = weights(tmp_path / "low")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_bf16_frozen_weights_need_bf16_autocast_and_no_growth(make_model, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frozen_dtype='bfloat16' needs bf16 autocast and no growth"):
        TrainConfig(mixed_precision="no", frozen_dtype="bfloat16")
    model = make_model("vit")
    lilt.apply_plan(model, LWA)
    config = TrainConfig(output_dir=str(tmp_path / "x"), steps=2, batch_size=8, report_to=[],
                         frozen_dtype="bfloat16")  # mixed_precision auto: resolves to none outside accelerate launch
    with pytest.raises(ConfigError, match="this run's mixed precision is 'no'"):
        train(model, data_config=DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 16}),
              config=config)
    assert not (tmp_path / "x").exists()


def test_native_bf16_on_a_gpu_excludes_emulation(monkeypatch) -> None:
    asked: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or not including_emulation)
    assert native_bf16("cuda") and asked == [False]
