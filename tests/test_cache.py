"""The training feature cache (lilt.cache): exact heads-only runs, invalidation, resume, size limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lilt
from lilt.cache import build_cache, cache_refusal, view_of
from lilt.config import ConfigError, DataConfig, TrainConfig
from lilt.data.resolve import resolve_data
from lilt.data.transforms import decode_image, image_transform
from lilt.recipe import TuningPlan
from lilt.training import train

from helpers import NO_DROPOUT, REPO, max_difference, weights, write_imagefolder

HEADS_ONLY = TuningPlan.from_dict({"name": "heads-only",
                                   "rules": [{"tower": "both", "method": "lock", "layers": "all"}]})


# A frozen prefix of vision blocks: the top block of the vision tower trains, the text tower is locked.
VISION_TOP = TuningPlan.from_dict({"name": "vision-top", "rules": [{"tower": "text", "method": "lock", "layers": "all"},
                                                                   {"tower": "vision", "method": "unlock",
                                                                    "layers": "top:1"}]})

LOCK_IMAGE = TuningPlan.from_recipe(REPO / "recipes" / "methods" / "lock-image.yaml")  # LiT: the text tower trains
# LilT's deep adapter: a block appended to each tower; both towers' frozen prefixes (token states) are cached.
DEEP = TuningPlan.from_recipe(REPO / "recipes" / "methods" / "deep.yaml")
FULL = REPO / "recipes" / "methods" / "full.yaml"


def heads_only(make_model, vision: str = "vit", plan: TuningPlan = HEADS_ONLY, **options) -> lilt.DualEncoder:
    model = make_model(vision, text_options=NO_DROPOUT, **options)
    lilt.apply_plan(model, plan)
    return model


def run(model, folder: Path, out: Path, **options) -> lilt.training.TrainResult:
    config = {"output_dir": str(out), "steps": 10, "batch_size": 8, "report_to": [], "resume": "never",
              "warmup_steps": 2, "lr": 1e-2, "log_every": 1, **options}
    data = {"source": str(folder), "text_column": "caption", "num_workers": 0, "max_bad_fraction": 0.2,
            "augment": "none"}
    data.update(config.pop("data", {}))
    return train(model, DataConfig(**data), TrainConfig(**config))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "pairs", 34, corrupt=2)  # 32 good pairs, 2 unreadable images


@pytest.mark.parametrize("vision, plan", [("vit", HEADS_ONLY), ("vit", VISION_TOP), ("cnn", VISION_TOP),
                                          ("vit", LOCK_IMAGE), ("vit", DEEP)],
                         ids=["heads-only", "vit-top-block", "cnn-top-block", "lock-image", "deep"])
def test_a_cached_run_gives_the_uncached_weights(make_model, folder: Path, tmp_path: Path, vision, plan) -> None:
    plain = run(heads_only(make_model, vision, plan), folder, tmp_path / "plain")
    cached = run(heads_only(make_model, vision, plan), folder, tmp_path / "cached", cache="auto")
    assert not (tmp_path / "plain" / "feature-cache").exists()
    assert len(list((tmp_path / "cached" / "feature-cache").glob("features-*.safetensors"))) == 1
    plain_weights, cached_weights = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    if vision == "vit":
        assert max_difference(plain_weights, cached_weights) < 1e-5
    else:
        # A CNN's convolutions round differently by batch size (7e-8: the cache fills in batches of 256), and
        # Adam turns that into up to ~0.2 lr on the few elements with near-zero gradients, by how much
        # depending on the CPU's kernels (1.7e-3 on an AVX512-BF16 EPYC). So the test bounds how many
        # elements moved: rounding moves 0.1% of them past 1e-4; cached features 0.1% off move 0.9%, 1% off 49%.
        diffs = [(plain_weights[k] - cached_weights[k]).abs().flatten() for k in plain_weights]
        trained = torch.cat([d for d in diffs if d.max() > 0])  # frozen tensors are identical in both runs
        share = float((trained > 1e-4).float().mean())
        assert float(trained.max()) < 1e-2 and share < 0.005, (float(trained.max()), share)
    assert cached.bad_items == plain.bad_items > 0  # the unreadable images are skipped and counted alike
    losses = [h["loss"] for h in cached.history if h.get("loss") is not None]
    assert losses[-1] < losses[0]  # it trained


def test_auto_leaves_a_plan_that_trains_the_vision_stem_uncached(make_model, folder: Path, tmp_path: Path) -> None:
    def full():
        model = make_model("vit", text_options=NO_DROPOUT)
        lilt.apply_plan(model, FULL)
        return model
    run(full(), folder, tmp_path / "off", steps=4)
    run(full(), folder, tmp_path / "auto", steps=4, cache="auto")
    assert not (tmp_path / "auto" / "feature-cache").exists()
    assert max_difference(weights(tmp_path / "off"), weights(tmp_path / "auto")) == 0.0
    assert "stem trains" in cache_refusal(full(), TrainConfig(), DataConfig(), None)
    assert "SLIP" in cache_refusal(heads_only(make_model), TrainConfig(ssl_weight=1.0), DataConfig(), None)
    assert cache_refusal(heads_only(make_model), TrainConfig(), DataConfig(), None) is None


def test_a_changed_transform_or_backbone_gets_its_own_cache(make_model, folder: Path, tmp_path: Path) -> None:
    data, _, data_config = resolve_data(None, DataConfig(source=str(folder), text_column="caption",
                                                         augment="none", num_workers=0), 0)
    config = TrainConfig(output_dir=str(tmp_path / "out"), cache="auto")
    model = heads_only(make_model)
    first = build_cache(model, data, config, data_config, progress=False)
    assert build_cache(model, data, config, data_config, progress=False).path == first.path  # read back, not redone
    other_size = heads_only(make_model, vision_options={"image_size": 24})
    resized = build_cache(other_size, data, config, data_config, progress=False)
    assert resized.path != first.path
    # The new file holds the new transform's features, not the old ones.
    image = image_transform(other_size.vision.data_config, "none")(decode_image(data[2]["image"]))
    with torch.no_grad():
        expected = other_size.eval().image_features(image[None])[0]
    row = int(resized.image_of_row[2])
    assert torch.allclose(resized.images[row], expected, atol=1e-5)
    assert not torch.allclose(resized.images[row], first.images[row], atol=1e-3)
    model.vision.backbone_sha256 = "0" * 64  # what other backbone weights would give
    assert build_cache(model, data, config, data_config, progress=False).path not in (first.path, resized.path)
    assert len(list((tmp_path / "out" / "feature-cache").glob("*.safetensors"))) == 3


@pytest.mark.parametrize("plan", [HEADS_ONLY, VISION_TOP, DEEP], ids=["heads-only", "vit-top-block", "deep"])
def test_resume_with_the_cache_is_exact(make_model, folder: Path, tmp_path: Path, plan) -> None:
    out = tmp_path / "run"
    options = {"steps": 12, "save_every": 6, "cache": "auto", "cache_views": 3, "resume": "auto",
               "data": {"augment": "crop-flip"}}
    run(heads_only(make_model, plan=plan), folder, out, **options)
    straight = weights(out)
    (cache,) = (out / "feature-cache").glob("*.safetensors")
    written = cache.stat().st_mtime_ns
    shutil.rmtree(out / "checkpoints" / "step-12")
    shutil.rmtree(out / "model")
    resumed = run(heads_only(make_model, plan=plan), folder, out, **options)
    assert resumed.resumed_from == 6
    assert cache.stat().st_mtime_ns == written  # the resumed run read the cache its first part wrote
    assert max_difference(straight, weights(out)) < 1e-6


def test_deep_caches_each_captions_token_states_and_its_length(make_model, folder: Path, tmp_path: Path) -> None:
    meta = folder / "metadata.jsonl"
    lines = [json.loads(line) for line in meta.read_text().splitlines()]
    for i, line in enumerate(lines):  # captions of 3 to 11 words
        line["caption"] += " and a red square" * (i % 3)
    meta.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data, _, data_config = resolve_data(None, DataConfig(source=str(folder), text_column="caption",
                                                         augment="none", num_workers=0), 0)
    model = heads_only(make_model, plan=DEEP)
    features = build_cache(model, data, TrainConfig(output_dir=str(tmp_path / "out"), cache="auto"), data_config,
                           progress=False)
    depth = len(model.text.backbone_blocks())
    assert features.text_depth == depth
    assert features.texts.shape[0] == int(features.text_lengths.sum())  # real tokens only, no padding stored
    assert len(set(features.text_lengths.tolist())) > 1  # captions of different lengths: padding is exercised
    rows = torch.nonzero(features.text_of_row >= 0)[[0, 5, 9], 0]  # three good rows
    batch = {"image_index": features.image_of_row[rows], "text_index": features.text_of_row[rows]}
    inputs = features.inputs(batch)
    tokens = model.tokenize([data[int(r)]["text"] for r in rows])
    assert torch.equal(inputs["attention_mask"], tokens["attention_mask"])  # padded to the batch's longest
    with torch.no_grad():
        expected = model.eval().text.forward_prefix(tokens, depth)[0]
    mask = tokens["attention_mask"].bool()
    assert torch.allclose(inputs["text_hidden"][mask], expected[mask], atol=1e-5)
    # The model trains the appended layer from them as from the tokens.
    with torch.no_grad():
        from_cache = model(image_features=torch.zeros(3, model.vision_proj.in_features), **{
            k: v for k, v in inputs.items() if k != "image_hidden"}).text_embeds
        live = model.encode_text(tokens)
    assert torch.allclose(from_cache, live, atol=1e-5)


def test_a_cache_over_the_size_limit_is_refused(make_model, folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache_max_gb=1e-09"):
        run(heads_only(make_model), folder, tmp_path / "big", cache="auto", cache_max_gb=1e-9)
    assert not list((tmp_path / "big").glob("feature-cache/*.safetensors"))


def test_the_view_of_an_item_is_the_same_in_every_process() -> None:
    # Fixed numbers: a draw salted per process (PYTHONHASHSEED) would change them from run to run.
    assert [view_of(0, e, r, 3) for e in (0, 1) for r in range(6)] == [1, 1, 1, 2, 0, 0, 2, 0, 0, 1, 1, 2]
    assert view_of(5, 2, 7, 1) == 0
    assert {view_of(0, 0, r, 4) for r in range(64)} == {0, 1, 2, 3}
