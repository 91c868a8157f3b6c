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
