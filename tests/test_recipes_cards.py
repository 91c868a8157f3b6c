"""Built-in recipes by name (API and CLI), the model card save_pretrained writes, and `lilt push`."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from huggingface_hub import ModelCard

import lilt
from lilt.cli import build_parser, main
from lilt.errors import ConfigError, HubError
from lilt.hub import CARD_NAME, MARKER, push_folder, update_card_evaluation
from lilt.recipe import RECIPES_DIR, Recipe, builtin_recipes, resolve_recipe

from helpers import REPO

TRAINING = {"source": "builtin:tiny-random", "split": "train", "steps": 6, "batch_size": 8, "pairs": 32,
            "pairs_per_lang": {"en": 11, "sw": 11, "yo": 10},
            "metrics": {"val/en/i2t/R@1": 12.5, "val/en/t2i/R@1": 25.0, "val/sw/i2t/R@1": 50.0,
                        "val/ha/i2t/R@1": 7.5, "val/all/i2t/R@1": 23.4, "val/all/mean_recall": 30.0}}


# -- recipes by name ------------------------------------------------------------------------------------
def test_every_shipped_recipe_has_a_unique_name_and_the_wheel_ships_it() -> None:
    names = builtin_recipes()
    files = [p for p in RECIPES_DIR.rglob("*.yaml") if p.relative_to(RECIPES_DIR).parts[0] != "accelerate"]
    assert len(names) == len(files), "two built-in recipes share a file name"
    assert {"lwa", "layernorm", "full", "demo", "low-resource-few-pairs", "staged-depth"} <= set(names)
    assert not any("accelerate" in p.parts for p in names.values())
    # Every YAML under lilt/recipes (accelerate configs too) matches a package-data glob, so wheels carry it.
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lilt"]
    for path in RECIPES_DIR.rglob("*"):
        if path.is_file():
            rel = path.relative_to(RECIPES_DIR.parent).as_posix()
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel
    assert (REPO / "recipes").resolve() == RECIPES_DIR.resolve()  # the repository path is the same files


def test_names_and_paths_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # away from the repository root, as for an installed wheel
    lwa = RECIPES_DIR / "methods" / "lwa.yaml"
    assert resolve_recipe("lwa") == lwa
    assert resolve_recipe("recipes/methods/lwa.yaml") == lwa  # the old spelling still works anywhere
    mine = tmp_path / "lwa"  # an existing file wins over a built-in name
    mine.write_text("plan: {name: mine, rules: [{tower: both, method: bitfit}]}\n")
    assert resolve_recipe("lwa").resolve() == mine
    mine.unlink()
    plan = lilt.TuningPlan.from_recipe("lwa")
    assert plan.name == "lwa" and [r.method for r in plan.rules] == ["adapter", "layernorm"]
    recipe = Recipe.from_file("low-resource-few-pairs", ["train.steps=7"])
    assert recipe.train.steps == 7 and recipe.plan is not None and recipe.data.pairs_per_lang


def test_apply_plan_by_name_matches_the_file(make_model) -> None:
    by_name, by_path = make_model("vit"), make_model("vit")
    lilt.apply_plan(by_name, "layernorm")
    lilt.apply_plan(by_path, RECIPES_DIR / "methods" / "layernorm.yaml")
    assert lilt.budget(by_name).to_dict() == lilt.budget(by_path).to_dict()
    assert lilt.budget(by_name).trainable > 0


def test_an_unknown_name_is_one_line_with_a_suggestion(make_model) -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'lwx'.*Did you mean 'lwa'\?.*lilt recipes") as err:
        lilt.apply_plan(make_model("vit"), "lwx")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):  # spelt as a path: a missing file, not a name
        Recipe.from_file("methods/lwx.yaml")


def test_cli_recipes_lists_and_prints(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lwa = next(line for line in lines if line.startswith("lwa "))
    assert lwa.split()[1:3] == ["methods", "plan"] and "layer-wise adapters" in lwa
    few = next(line for line in lines if line.startswith("low-resource-few-pairs "))
    assert "multilingual" in few and "model+plan+data+train" in few and "Yor" in few
    assert any(line.strip().endswith("accelerate/fsdp.yaml") for line in lines)
    assert main(["recipes", "bitfit"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["plan"]["name"] == "bitfit"
    assert build_parser().parse_args(["demo"]).recipe == "demo"
    assert Recipe.from_file("demo").plan is not None


def test_cli_takes_names_and_refuses_unknown_ones(tiny_dirs, capsys: pytest.CaptureFixture) -> None:
    backbones = ["--vision", str(tiny_dirs["vit"]), "--text", str(tiny_dirs["bert"])]
    assert main(["info", "--recipe", "bitfit", *backbones, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == "bitfit"
    for args in (["info", "--recipe", "bitfti", *backbones], ["train", "--recipe", "low-resource-few-pair"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Did you mean" in err and err.startswith(f"lilt {args[0]}: error: unknown recipe")


# -- model cards ------------------------------------------------------------------------------------------
@pytest.fixture()
def model(make_model):
    model = make_model("vit")
    lilt.apply_plan(model, "lwa")
    return model


def test_save_pretrained_writes_a_hub_model_card(model, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "m", training=TRAINING)
    card = ModelCard.load(path / CARD_NAME)
    data = card.data
    assert data.library_name == "lilt" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.tags == ["lilt", "clip", "image-text-retrieval", "zero-shot-image-classification",
                         "parameter-efficient-fine-tuning"]
    assert data.language == ["en", "sw", "yo", "ha"]  # trained, then evaluated only (pooled rows left out)
    assert data.license == "other" and "license unknown to lilt" in card.text  # tiny backbones say nothing
    assert data.datasets is None  # a builtin source is not a Hub dataset id
    budget = lilt.budget(model)
    assert f"{budget.trainable:,} of {budget.total:,} parameters train ({budget.percent:.2f}%)" in card.text
    assert "pairs per language: en 11, sw 11, yo 10" in card.text and "steps: 6 at batch size 8" in card.text
    assert "| ha | 7.5 |" in card.text and "| sw | 50.0 |" in card.text  # the validation table, per language
    assert "lilt.DualEncoder.from_pretrained(" in card.text and f"`{model.vision.source}`" in card.text
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_the_card_never_breaks_loading(model, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "m")
    assert "Not evaluated yet" in (path / CARD_NAME).read_text()
    (path / CARD_NAME).write_bytes(b"\xff\xfe not a card --- at all")
    loaded = lilt.DualEncoder.from_pretrained(path)
    assert lilt.budget(loaded).trainable == lilt.budget(model).trainable
    (path / CARD_NAME).unlink()
    lilt.DualEncoder.from_pretrained(path)


def test_saving_again_replaces_lilts_card_but_keeps_a_persons(model, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "m")
    model.save_pretrained(path, training=TRAINING)
    assert "pairs per language" in (path / CARD_NAME).read_text()  # lilt's own card was regenerated
    (path / CARD_NAME).write_text("# My model\n\nHand-written.\n")
    model.save_pretrained(path, training=TRAINING)
    assert (path / CARD_NAME).read_text() == "# My model\n\nHand-written.\n"
    assert MARKER not in (path / CARD_NAME).read_text()


def test_a_card_that_cannot_be_built_leaves_the_previous_folder_whole(model, tmp_path: Path, monkeypatch) -> None:
    import lilt.checkpoint

    path = model.save_pretrained(tmp_path / "m", training=TRAINING)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lilt.checkpoint, "build_card", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # weights, config and card together
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_license_comes_from_the_backbones_cards(tiny_dirs, tmp_path: Path) -> None:
    for name in ("vit", "bert"):
        shutil.copytree(tiny_dirs[name], tmp_path / name)
        (tmp_path / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    model = lilt.DualEncoder.from_backbones(str(tmp_path / "vit"), str(tmp_path / "bert"), embed_dim=16,
                                            vision_options={"image_size": 32})
    lilt.apply_plan(model, "bitfit")
    assert ModelCard.load(model.save_pretrained(tmp_path / "m") / CARD_NAME).data.license == "apache-2.0"


def test_training_writes_its_data_and_validation_table_on_the_card(make_model, tmp_path: Path) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, "bitfit")
    config = lilt.TrainConfig(output_dir=str(tmp_path / "out"), steps=2, batch_size=8, report_to=[], resume="never")
    data = lilt.DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 16})
    result = lilt.train(model, data, config)
    card = ModelCard.load(result.output_dir / "model" / CARD_NAME)
    assert set(card.data.language) == {"en", "sw", "yo"}
    assert "source: `builtin:tiny-random`" in card.text and "- pairs: 16" in card.text
    recall = result.metrics["val/en/i2t/R@1"]  # tiny-random has a validation split: its final recall is on the card
    assert f"| en | {recall:.1f} |" in card.text and "on the training run's validation pairs" in card.text


def test_eval_rows_update_the_card_table_only(model, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "m", training=TRAINING)
    weights = (path / "model.safetensors").read_bytes()
    rows = [{"dataset": "builtin:emoji-cldr:test", "task": "retrieval", "model": "m", "language": lang,
             "metrics": {"i2t/R@1": value, "t2i/R@1": value / 2}} for lang, value in (("en", 40.0), ("am", 12.0))]
    update_card_evaluation(path, rows)
    card = ModelCard.load(path / CARD_NAME)
    assert "| am | 12.0 | 6.0 |" in card.text and "Retrieval recall (%) per language, on `builtin:emoji-cldr:test`" \
        in card.text
    assert "| ha |" not in card.text  # the training table is replaced, not appended to
    assert card.data.language == ["en", "sw", "yo", "ha", "am"] and "pairs per language" in card.text
    assert (path / "model.safetensors").read_bytes() == weights
    lilt.DualEncoder.from_pretrained(path)


# -- lilt push ----------------------------------------------------------------------------------------------
def test_push_offline_is_one_line(model, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = model.save_pretrained(tmp_path / "m")
    assert main(["push", "--model", str(path), "--repo", "someone/tiny-lilt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lilt push: error: cannot reach the Hugging Face Hub (offline: HF_HUB_OFFLINE=1);")
    assert main(["push", "--model", str(path), "--repo", "not a repo"]) == 2
    assert "USER/NAME" in capsys.readouterr().err


class FakeApi:
    """Records HfApi calls; `fail` makes upload_folder raise it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise self.fail
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_uploads_the_folder(model, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    path = model.save_pretrained(tmp_path / "m")
    (tmp_path / "eval").mkdir()  # `lilt eval --out eval` results go on the card before the upload
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(
        [{"dataset": "builtin:tiny-random:test", "model": "m", "language": "yo", "metrics": {"i2t/R@1": 33.0}}]))
    args = ["push", "--model", str(path), "--repo", "someone/tiny-lilt", "--private", "--eval", str(tmp_path / "eval")]
    assert main(args) == 0
    assert "https://huggingface.co/someone/tiny-lilt/commit/abc" in capsys.readouterr().out
    assert "| yo | 33.0 |" in (path / CARD_NAME).read_text()
    assert api.calls[0] == ("create_repo", "someone/tiny-lilt", {"private": True, "exist_ok": True})
    kind, upload = api.calls[1]
    assert kind == "upload_folder" and upload["repo_id"] == "someone/tiny-lilt"
    assert upload["folder_path"] == str(path) and upload["ignore_patterns"] == [".*"]
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        push_folder(path, "someone/tiny-lilt", api=FakeApi(fail=httpx.ConnectError("name resolution failed")))
    (path / "model.safetensors").write_bytes(b"edited")  # a damaged checkpoint is never published
    assert main(["push", "--model", str(path), "--repo", "someone/tiny-lilt"]) == 2
    assert "sha256" in capsys.readouterr().err and len(api.calls) == 2
