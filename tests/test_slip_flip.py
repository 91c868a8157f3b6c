"""Scaling (Down) CLIP's two levers: SLIP (a SimCLR term on extra views) and FLIP (ViT patch dropping)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lilt
from lilt.config import ConfigError, DataConfig, TrainConfig
from lilt.data import PairCollator, image_transform, ssl_view_transform
from lilt.losses import simclr_loss
from lilt.training import prepare_ssl_head, train

from helpers import DATA_CONFIG, LWA, NO_DROPOUT, max_difference, sample_batch, write_images


def tiny_model(make_model, **vision) -> lilt.DualEncoder:
    model = make_model("vit", text_options=NO_DROPOUT, vision_options={"image_size": 32, **vision})
    lilt.apply_plan(model, LWA)
    return model


def slip_config(out: Path, **options) -> TrainConfig:
    options = {"resume": "never", "ssl_weight": 1.0, **options}
    return TrainConfig(output_dir=str(out), steps=4, batch_size=8, lr=1e-3, warmup_steps=1, report_to=[], log_every=1,
                       **options)


TINY = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 16})


# -- SLIP -------------------------------------------------------------------------------------------
def collator(views: bool, seed: int = 3) -> PairCollator:
    return PairCollator(image_transform(DATA_CONFIG, "crop-flip"), tokenize=None, seed=seed,
                        views=ssl_view_transform(DATA_CONFIG) if views else None)


def test_slip_views_differ_and_are_redrawn_exactly_from_seed_epoch_and_row(tmp_path: Path) -> None:
    names = write_images(tmp_path, 2, size=32)
    item = {"image": {"path": str(tmp_path / names[1]), "bytes": None}, "text": "x", "__row__": 7, "__epoch__": 0}
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    batch = collator(views=True)([item])
    assert torch.equal(torch.random.get_rng_state(), before)  # the loop's own stream (dropout) is untouched
    views = batch["ssl_views"]
    assert views.shape == (1, 2, 3, 16, 16)
    assert not torch.equal(views[0, 0], views[0, 1])
    assert not torch.equal(views[0, 0], batch["pixel_values"][0])
    again = collator(views=True)([item])  # a resumed run draws them afresh: the same tensors
    assert torch.equal(again["ssl_views"], views) and torch.equal(again["pixel_values"], batch["pixel_values"])
    assert not torch.equal(collator(views=True)([{**item, "__epoch__": 1}])["ssl_views"], views)
    assert not torch.equal(collator(views=True, seed=4)([item])["ssl_views"], views)


def test_slip_off_draws_nothing_more(tmp_path: Path, make_model) -> None:
    names = write_images(tmp_path, 3, size=32)
    items = [{"image": {"path": str(tmp_path / n), "bytes": None}, "text": "x", "__row__": i, "__epoch__": 2}
             for i, n in enumerate(names)]
    off, on = collator(views=False)(items), collator(views=True)(items)
    assert "ssl_views" not in off
    assert torch.equal(off["pixel_values"], on["pixel_values"])  # the main view's stream is the same either way
    model = tiny_model(make_model)
    before = torch.random.get_rng_state()
    prepare_ssl_head(model, TrainConfig(ssl_weight=0.0))
    assert model.ssl_head is None and torch.equal(torch.random.get_rng_state(), before)


def test_slip_loss_decreases_on_tiny_data(make_model, tmp_path: Path) -> None:
    model = tiny_model(make_model)
    model.add_ssl_head()
    names = write_images(tmp_path, 8, size=32)
    collate = PairCollator(image_transform(model.vision.data_config, "crop-flip"), tokenize=None, seed=0,
                           views=ssl_view_transform(model.vision.data_config))
    views = collate([{"image": {"path": str(tmp_path / n), "bytes": None}, "__row__": i}
                     for i, n in enumerate(names)])["ssl_views"]
    text = model.tokenize(["x"] * len(names))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same dropout each step: only the weights change
        out = model(views[:, 0], **text, ssl_views=views)
        loss = simclr_loss(out.ssl_a, out.ssl_b, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_slip_run_saves_its_head_and_a_resume_matches_a_straight_run(make_model, tmp_path: Path) -> None:
    straight = tiny_model(make_model)
    result = train(straight, TINY, slip_config(tmp_path / "a", save_every=2))
    logged = [h for h in result.history if "loss" in h]
    assert len(logged) == 4 and all(h["loss"] > h["ssl_loss"] > 0 for h in logged)  # the loss includes the term
    manifest = json.loads((tmp_path / "a" / "model" / "lilt_config.json").read_text())
    assert manifest["ssl_head"] == [32, 32, 16]
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "a" / "model")
    assert max_difference(loaded.delta_state_dict(), straight.delta_state_dict()) == 0.0
    assert any(k.startswith("ssl_head.") for k in loaded.delta_state_dict())
    resumed = tiny_model(make_model)  # steps 3 and 4 again, from the step-2 checkpoint
    train(resumed, TINY, slip_config(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-2")))
    assert max_difference(resumed.delta_state_dict(), straight.delta_state_dict()) == 0.0
    plain = tiny_model(make_model)  # the SSL term is really in the loss
    off = train(plain, TINY, slip_config(tmp_path / "c", ssl_weight=0.0))
    assert [h["loss"] for h in off.history if "loss" in h] != [h["loss"] for h in result.history if "loss" in h]
    assert plain.ssl_head is None


@pytest.mark.parametrize("options, words", [
    ({"ssl_weight": -1.0}, "ssl_weight=-1.0"),
    ({"ssl_temperature": 0.0}, "ssl_temperature=0.0"),
    ({"ssl_weight": 0.5, "accumulation_steps": 2, "batch_size": 8}, "plain accumulation"),
])
def test_slip_settings_that_cannot_work_are_refused(options: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**options)
    TrainConfig(ssl_weight=0.5, accumulation_steps=2, batch_size=8, accumulation="plain")  # this one works


# -- FLIP -------------------------------------------------------------------------------------------
def tokens_into_blocks(model: lilt.DualEncoder, images: torch.Tensor) -> int:
    seen = []
    hook = model.vision.backbone.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    try:
        model.encode_image(images)
    finally:
        hook.remove()
    return seen[0]


def test_flip_drops_patches_in_training_only(make_model) -> None:
    masked, full = make_model("vit", vision_options={"image_size": 32, "mask_ratio": 0.5}), make_model("vit")
    images, _ = sample_batch(full, n=2)
    masked.eval()
    full.eval()
    with torch.no_grad():
        assert tokens_into_blocks(masked, images) == tokens_into_blocks(full, images) == 1 + 16
        assert torch.equal(masked.encode_image(images), full.encode_image(images))
        masked.train()
        assert tokens_into_blocks(masked, images) == 1 + 8  # the class token and half of the 16 patches
        assert not torch.allclose(masked.encode_image(images), masked.encode_image(images))


def test_flip_ratio_is_recorded_with_the_model(make_model, tmp_path: Path) -> None:
    model = make_model("vit", vision_options={"image_size": 32, "mask_ratio": 0.25})
    model.save_pretrained(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "lilt_config.json").read_text())
    assert manifest["model"]["vision"]["mask_ratio"] == 0.25
    loaded = lilt.DualEncoder.from_pretrained(tmp_path / "m")
    assert loaded.vision.backbone.patch_drop.prob == 0.25
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert loaded.training  # as loaded; embed_images still embeds every patch
    assert torch.equal(loaded.embed_images([image]), loaded.embed_images([image]))
    assert loaded.training


def test_flip_on_a_cnn_or_out_of_range_is_refused(make_model) -> None:
    with pytest.raises(ConfigError, match=r"mask_ratio=0.5 drops ViT patch tokens.*not a ViT \(efficientnet tower\)"):
        make_model("cnn", vision_options={"image_size": 32, "mask_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"mask_ratio=1.0 must be in \[0, 1\)"):
        make_model("vit", vision_options={"image_size": 32, "mask_ratio": 1.0})
