"""Training on builtin:emoji-cldr with the packaged backbones, and `lilt demo` end to end (on a small slice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lilt
from lilt.data import emoji_cldr
from lilt.data.emoji_cldr import APT_HINT
from lilt.data.resolve import resolve_data

pytestmark = pytest.mark.skipif(
    not (Path(emoji_cldr.FONT_PATH).exists() and Path(emoji_cldr.CLDR_DIR).exists()),
    reason=f"the emoji font and CLDR annotations are not installed: {APT_HINT}")

PACKAGED = dict(vision="packaged:efficientnet-lite0", text="packaged:multilingual-e5-small")


def test_short_training_lifts_validation_recall_well_above_untrained(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the heads' initialization
    model = lilt.DualEncoder.from_backbones(**PACKAGED, vision_options={"image_size": 64}, embed_dim=128,
                                            init_temperature=0.1, min_temperature=0.1)
    lilt.apply_plan(model, lilt.TuningPlan(name="heads"))  # heads only: the frozen features do the work
    data = lilt.DataConfig(source="builtin:emoji-cldr", langs=["en"], pairs_per_lang={"en": 400}, augment="none")
    train, val, _ = resolve_data(None, data, seed=0)
    before = lilt.evaluate_retrieval(model, val)["en"]
    config = lilt.TrainConfig(steps=100, batch_size=32, lr=2e-3, warmup_steps=5, eval_every=100, log_every=20,
                              output_dir=str(tmp_path), report_to=[], resume="never")
    result = lilt.train(model, train, config, data_config=data, val_data=val)
    after = lilt.evaluate_retrieval(model, val)["en"]
    assert len(train) == 400 and len(set(val["emoji"])) > 100
    assert before["i2t/R@1"] < 3 and before["t2i/R@1"] < 3  # chance is 1 in ~150 emoji
    assert after["i2t/R@1"] > before["i2t/R@1"] + 8 and after["t2i/R@1"] > before["t2i/R@1"] + 8, (before, after)
    assert result.metrics["val/en/i2t/R@1"] == pytest.approx(after["i2t/R@1"], abs=1e-6)


@pytest.mark.parametrize("levers", [False, True])  # the scoring levers: hubness, ridge ensemble, translation
def test_demo_end_to_end_on_a_small_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str], levers: bool) -> None:
    from lilt.demo import MODELS, run_demo

    small = ["model.vision.image_size=64", "data.langs=[en,sw]", "data.pairs_per_lang={en: 64, sw: 32}",
             "data.num_workers=0", "train.steps=4", "train.batch_size=16", "train.warmup_steps=1",
             "train.eval_every=2", "train.save_every=4", "train.head_warmup_epochs=2", "train.report_to=[]",
             "eval.langs=[en,sw,yo]", f"eval.hubness={str(levers).lower()}",
             f"eval.ridge_ensemble={str(levers).lower()}", f"eval.translate={str(levers).lower()}",
             f"eval.ridge_towers={'tuned' if levers else 'frozen'}",  # the ensemble's map on the trained towers
             *(["data.parallel=builtin:emoji-cldr", "data.parallel_langs=[sw]", "data.parallel_per_lang=200"]
               if levers else [])]
    assert run_demo(tmp_path, "recipes/demo.yaml", small) == 0
    out = capsys.readouterr().out
    assert "| lang | train pairs |" in out and "| yo | 0 |" in out  # yo: no training pairs, zero-shot only
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert results["train_pairs"] == {"en": 64, "sw": 32}
    # each model's own bank, k and beta from the candidates choose_hubness tries
    assert ("hubness" in results) == levers and ("hubness correction" in out) == levers
    assert ("ridge_ensemble" in results) == levers and ("mixed with the ridge map" in out) == levers
    assert ("translation" in results) == levers
    assert "multi-scale image features" in out  # the recipe's eval.ridge_features: stages
    # and eval.ridge_kernel: rbf-two-way, its reverse map's choices printed
    assert "rbf-two-way kernel" in out and "reverse weight" in out
    if levers:
        assert set(results["hubness"]) == set(MODELS)
        assert all(h["k"] in (5, 10, 20, 50) and h["beta"] in (0.0, 0.25, 0.5, 0.75, 1.0)
                   for h in results["hubness"].values())
        # every model's own maps, in its own space; sw only (the parallel text's language)
        # (and the ensemble's map refitted on the trained towers: its own maps too)
        assert set(results["translation"]) == {*MODELS, "trained towers' map"}
        assert "maps fitted on the parallel text" in out and "refitted on the trained towers' features" in out
        assert results["ridge_tuned_towers"]["ridge_reverse_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert all(set(t) == {"sw"} and t["sw"]["strength"] in (0.0, 0.5, 0.75, 1.0) and t["sw"]["alpha"] > 0
                   for t in results["translation"].values())
        tried = results["ridge_ensemble"]["val_mean_recall"]
        # the weight and the trained model's k and beta: one argmax over the joint validation grid
        h = results["hubness"]["trained"]
        assert max(tried, key=tried.__getitem__) == f"w={results['ridge_ensemble']['weight']:g} k={h['k']} " \
            f"beta={h['beta']:g}"
    for name in MODELS:
        for lang in ("en", "sw", "yo"):
            assert 0 <= results["results"][name][lang]["i2t/R@1"] <= 100
            assert 0 <= results["results"][name][lang]["t2i/R@1"] <= 100
    assert (tmp_path / "demo.png").stat().st_size > 10_000 and (tmp_path / "demo_results.md").is_file()
    reloaded = lilt.DualEncoder.from_pretrained(tmp_path / "model")
    assert reloaded.vision.data_config["input_size"][-1] == 64
