"""Recipes: one parser for the CLI, the demo and the API; every section and key checked, with the file named."""

from __future__ import annotations

from pathlib import Path

import pytest

import lilt
from lilt.cli import main
from lilt.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "recipes")) for p in SHIPPED])
def test_every_shipped_recipe_parses(path: Path) -> None:
    recipe = Recipe.from_file(path)
    assert recipe.plan is not None or recipe.init is not None
    if recipe.plan is not None:
        assert lilt.TuningPlan.from_recipe(path).rules == recipe.plan.rules  # swap-text-tower.yaml included


@pytest.mark.parametrize("text,message", [
    ("trian: {steps: 3}\n", r"unknown section 'trian'\. Did you mean 'train'\?"),
    ("train: {stpes: 3}\n", r"recipe.yaml:train: unknown key 'stpes'\. Did you mean 'steps'\?"),
    ("model: {vision: {nmae: x}}\n", r"recipe.yaml:model.vision: unknown key 'nmae'"),
    ("train: {lr: .nan}\n", r"recipe.yaml:train.lr: nan is not a finite number"),
    ("train: {betas: [0.9, 1.5]}\n", r"betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("data: {pairs_per_lang: {sw: -5}}\n", r"pairs_per_lang: -5 pairs for sw is negative"),
    ("plan: {rules: [{tower: both, method: adaptr}]}\n", r"unknown tuning method 'adaptr'.*Did you mean 'adapter'"),
    ("plan: {rules: [{tower: both, method: adapter, layers: 'top:x'}]}\n", r"layers='top:x' is not understood"),
    ("plan: {rules: [{tower: both, method: adapter, options: {rank: 4}}]}\n", r"adapter options: unknown key 'rank'"),
    ("train: {steps: 4, growth: [{steps: 4, grow: ['depth:text:100000']}]}\n", r"\[1, 64\]"),
    ("init: {from: x}\nplan: {rules: []}\n", r"keeps that model's plan"),
    ("- a list\n", r"expected a mapping at the top level"),
    ("eval: {ridge_features: stage}\n", r"eval.ridge_features: 'stage' is not one of \['pooled', 'stages'\]"),
    ("eval: {ridge_kernel: RBF}\n", r"eval.ridge_kernel: 'RBF' is not one of \['linear', 'rbf', 'rbf-two-way'\]"),
    ("eval: {ridge_towers: tuned}\n", r"eval.ridge_towers=tuned is the ensemble's ridge map .* set "
     r"eval.ridge_ensemble: true"),
])
def test_a_bad_recipe_names_the_key_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(lilt.ConfigError, match=message):
        Recipe.from_file(path)


def test_a_recipe_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"train: {steps: 3}\n# caf\xe9\n")
    with pytest.raises(lilt.ConfigError, match="not UTF-8"):
        Recipe.from_file(path)


def test_overrides_are_checked_like_the_file(tmp_path: Path) -> None:
    recipe = Recipe.from_file(REPO / "recipes" / "demo.yaml", ["train.steps=7", "data.pairs_per_lang={sw: 3}"])
    assert recipe.train.steps == 7 and recipe.data.pairs_per_lang == {"sw": 3}
    with pytest.raises(lilt.ConfigError, match="Quote the whole override"):
        Recipe.from_file(REPO / "recipes" / "demo.yaml", ["data.pairs_per_lang={sw:", "300}"])
    with pytest.raises(lilt.ConfigError, match="not KEY=VALUE"):
        Recipe.from_file(REPO / "recipes" / "demo.yaml", ["train.steps"])
    with pytest.raises(lilt.ConfigError, match="unknown key 'setps'"):
        Recipe.from_file(REPO / "recipes" / "demo.yaml", ["train.setps=3"])


def test_lilt_train_prints_one_line_and_exits_2_on_a_bad_recipe(tmp_path: Path, capsys) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("plan: {rules: [{tower: both, method: layernorm}]}\ntrian: {steps: 3}\n")
    assert main(["train", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lilt train: error:") and "'trian'" in err[0]
