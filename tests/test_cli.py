"""The `lilt` command line, run in-process and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lilt.cli import main


def test_info_json_on_tiny_backbones(tiny_dirs, capsys):
    args = ["info", "--recipe", "recipes/methods/layernorm.yaml", "--vision", str(tiny_dirs["vit"]),
            "--text", str(tiny_dirs["bert"]), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"trainable", "total", "percent", "by_tower", "by_method"} <= set(report)
    assert report["by_method"]["layernorm"]["trainable"] > 0
    assert report["percent"] == pytest.approx(100 * report["trainable"] / report["total"], abs=1e-3)


def test_info_table_and_full_recipe(tiny_dirs, capsys):
    args = ["info", "--recipe", "recipes/methods/full.yaml", "--vision", str(tiny_dirs["cnn"]),
            "--text", str(tiny_dirs["bert"])]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(100.00%)" in out and "unlock" in out


def test_info_lists_methods_with_options(capsys):
    assert main(["info", "--methods"]) == 0
    out = capsys.readouterr().out
    for name in ("lock", "layernorm", "bitfit", "adapter", "lora", "ia3", "unlock", "deep"):
        assert f"\n{name} " in "\n" + out
    assert "reduction_factor" in out and "num_blocks" in out


def test_bad_recipe_exits_2_with_a_message(tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan:\n  rules:\n    - {tower: both, method: lorra}\n")
    args = ["info", "--recipe", str(bad), "--vision", str(tiny_dirs["vit"]), "--text", str(tiny_dirs["bert"])]
    assert main(args) == 2
    assert "unknown tuning method 'lorra'" in capsys.readouterr().err


SCRIPT = Path(sys.executable).parent / "lilt"  # installed beside the interpreter by `pip install -e .`


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"no lilt console script beside {sys.executable}: pip install -e .")
def test_console_script_lists_commands_without_importing_torch():
    code = "import sys, lilt.cli; lilt.cli.build_parser(); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "info" in out and "demo" in out


@pytest.mark.parametrize("path", sorted(Path("recipes").glob("multilingual/*.yaml")) + [Path("recipes/demo.yaml")],
                         ids=str)
def test_shipped_training_recipes_parse(path: Path) -> None:
    import yaml

    from lilt.config import DataConfig, ModelConfig, TrainConfig
    from lilt.plan import TuningPlan

    recipe = yaml.safe_load(path.read_text())
    assert set(recipe) <= {"model", "plan", "data", "train", "eval", "init"}, path
    TuningPlan.from_dict(recipe["plan"], where=str(path))
    TrainConfig.from_dict(recipe["train"], where=str(path))
    DataConfig.from_dict(recipe["data"], where=str(path))
    if "model" in recipe:
        ModelConfig.from_dict(recipe["model"], where=str(path))
    assert path.read_text().startswith("#"), "a recipe opens with a comment on the situation it is for"


def test_eval_report_embed_and_search_on_a_saved_tiny_model(make_model, tmp_path: Path, capsys) -> None:
    import lilt

    model = make_model("vit")
    lilt.apply_plan(model, "recipes/methods/layernorm.yaml")
    model.save_pretrained(tmp_path / "m")
    for run in ("a", "b"):
        assert main(["eval", "--model", str(tmp_path / "m"), "--data", "builtin:tiny-random:test",
                     "--out", str(tmp_path / run)]) == 0
    out = capsys.readouterr().out
    assert "| lang | i2t/R@1 |" in out and "| sw |" in out and "| all |" in out
    rows = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert {r["language"] for r in rows} == {"en", "sw", "yo", "all"}
    assert {"i2t/R@10", "t2i/R@10"} <= set(rows[0]["metrics"]) and rows[0]["trainable_percent"] > 0
    assert (tmp_path / "a" / "eval.png").stat().st_size > 5_000 and (tmp_path / "a" / "eval.md").is_file()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.png").is_file()
    assert "| a i2t/R@1 | b i2t/R@1 |" in (tmp_path / "cmp" / "report.md").read_text()  # headers name the metric
    assert main(["embed", "--model", str(tmp_path / "m"), "--data", "builtin:tiny-random:test",
                 "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    assert main(["search", "--model", str(tmp_path / "m"), "--index", str(tmp_path / "index.safetensors"),
                 "--query", "red cat", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "'red cat':" and len(lines) == 4 and lines[1].strip().startswith("1.")


def test_eval_with_the_scoring_levers_names_their_choices(make_model, tmp_path: Path, capsys) -> None:
    make_model("vit").save_pretrained(tmp_path / "m")
    bank = ["--train-data", "builtin:tiny-random:train", "--val-data", "builtin:tiny-random:validation"]
    base = ["eval", "--model", str(tmp_path / "m"), "--data", "builtin:tiny-random:test", "--hubness"]
    assert main([*base, *bank, "--out", str(tmp_path / "h")]) == 0
    rows = json.loads((tmp_path / "h" / "eval.json").read_text())
    assert {r["hubness_k"] for r in rows} <= {5, 10, 20, 50}
    assert {r["hubness_beta"] for r in rows} <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert rows[0]["levers_fitted_on"] == "builtin:tiny-random:train" and "ridge_ensemble_weight" not in rows[0]
    assert main([*base, "--ridge-ensemble", *bank, "--out", str(tmp_path / "e")]) == 0
    rows = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert rows[0]["ridge_ensemble_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0) and rows[0]["ridge_alpha"] > 0
    assert rows[0]["ridge_features"] == "pooled"
    assert main([*base, "--ridge-ensemble", "--ridge-features", "stages", *bank, "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "eval.json").read_text())[0]["ridge_features"] == "stages"
    assert main([*base, "--ridge-ensemble", "--ridge-kernel", "rbf", *bank, "--out", str(tmp_path / "k")]) == 0
    rows = json.loads((tmp_path / "k" / "eval.json").read_text())
    assert rows[0]["ridge_kernel"] == "rbf" and rows[0]["ridge_gamma"] in (0.5, 1.0, 2.0, 4.0)
    assert "ridge_reverse_weight" not in rows[0]
    assert main([*base, "--ridge-ensemble", "--ridge-kernel", "rbf-two-way", *bank, "--out", str(tmp_path / "t")]) == 0
    rows = json.loads((tmp_path / "t" / "eval.json").read_text())
    assert rows[0]["ridge_kernel"] == "rbf-two-way" and rows[0]["ridge_reverse_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert rows[0]["ridge_towers"] == "frozen"
    assert main([*base, "--ridge-ensemble", "--ridge-towers", "tuned", *bank, "--out", str(tmp_path / "u")]) == 0
    assert json.loads((tmp_path / "u" / "eval.json").read_text())[0]["ridge_towers"] == "tuned"
    capsys.readouterr()
    assert main([*base, "--ridge-kernel", "rbf", *bank]) == 2
    assert "--ridge-kernel rbf: choose one of linear, rbf, rbf-two-way; all but linear go with --ridge-ensemble" \
        in capsys.readouterr().err
    assert main([*base, "--ridge-towers", "tuned", *bank]) == 2
    assert "--ridge-towers tuned: choose one of frozen, tuned; tuned goes with --ridge-ensemble" \
        in capsys.readouterr().err
    assert main([*base, "--ridge-features", "stages", *bank]) == 2
    assert "--ridge-features stages: choose pooled or stages; stages goes with --ridge-ensemble" in \
        capsys.readouterr().err
    assert main([*base, "--train-data", "builtin:tiny-random:train"]) == 2
    assert "--hubness (task retrieval, --train-data builtin:tiny-random:train, --val-data None)" in \
        capsys.readouterr().err


def test_eval_translates_captions_with_parallel_text(make_model, tmp_path: Path, capsys) -> None:
    make_model("vit").save_pretrained(tmp_path / "m")
    table = tmp_path / "par.csv"  # tiny-random's sw captions are words of the tiny BERT; so are these
    words = zip(["red", "cat", "dog", "tree", "car", "bird"] * 2,
                ["blue", "house", "boat", "small", "large", "green"] * 2)
    table.write_text("source,target,lang\n" + "".join(f"{a} {b},{b} {a},sw\n" for a, b in words))
    base = ["eval", "--model", str(tmp_path / "m"), "--data", "builtin:tiny-random:test", "--parallel", str(table)]
    val = ["--val-data", "builtin:tiny-random:validation"]
    assert main([*base, *val, "--out", str(tmp_path / "t")]) == 0
    rows = json.loads((tmp_path / "t" / "eval.json").read_text())
    assert rows[0]["translation_strength_sw"] in (0.0, 0.5, 0.75, 1.0) and "levers_fitted_on" not in rows[0]
    assert main([*base, *val, "--ridge-ensemble", "--train-data", "builtin:tiny-random:train",
                 "--out", str(tmp_path / "e")]) == 0
    rows = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert rows[0]["translation_strength_sw"] in (0.0, 0.5, 0.75, 1.0) and "ridge_ensemble_weight" in rows[0]
    capsys.readouterr()
    assert main(base) == 2
    assert f"--parallel {table} (task retrieval, --val-data None)" in capsys.readouterr().err


def test_eval_reports_a_missing_model_cleanly(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", "builtin:tiny-random:test"]) == 2
    assert "lilt eval: error:" in capsys.readouterr().err
