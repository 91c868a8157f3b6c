"""Checkpoints and tables are data: nothing in them runs code, nothing outside a table's folder is opened.

Each scenario runs in a subprocess with `sys.addaudithook` recording every file `open`, so the tests
see what lilt (and transformers, timm, datasets under it) really touched, not what it meant to touch.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lilt
from lilt.checkpoint import CONFIG_NAME, WEIGHTS_NAME, config_digest

REPO = Path(__file__).resolve().parents[2]

AUDITED = r'''
import json, os, sys, traceback
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(str(args[0]))
sys.addaudithook(hook)
import lilt
from lilt.data import load_pairs
results = {}
for name, call in json.loads(sys.argv[1]).items():
    start = len(opened)
    try:
        if call["what"] == "from_pretrained":
            lilt.DualEncoder.from_pretrained(call["path"], **call.get("kwargs", {}))
            results[name] = "loaded"
        else:
            load_pairs(call["path"])
            results[name] = "loaded"
    except lilt.LiltError as err:
        results[name] = "LiltError: " + str(err)
    except Exception:
        results[name] = "traceback: " + traceback.format_exc()
    results[name + ":opened"] = sorted(set(opened[start:]))
print(json.dumps(results))
'''


class Marker:
    """A pickle that, if anything ever unpickles it, leaves a file behind."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pickle was executed"))


def audited(calls: dict, tmp_path: Path) -> dict:
    script = tmp_path / "audited.py"
    script.write_text(AUDITED)
    result = subprocess.run([sys.executable, str(script), json.dumps(calls)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def evil(make_model, tiny_dirs, tmp_path: Path) -> dict[str, Path]:
    """A saved model, a copy whose config asks for remote code, an evil text backbone, planted pickles."""
    model = make_model("vit")
    lilt.apply_plan(model, lilt.TuningPlan([{"tower": "both", "method": "layernorm"}], name="ln"))
    saved = model.save_pretrained(tmp_path / "saved")
    markers = tmp_path / "markers"
    markers.mkdir()
    # The backbone folder: auto_map pointing at a module that would leave a marker, and a pickle beside
    # the safetensors weights.
    text = tmp_path / "evil-bert"
    shutil.copytree(tiny_dirs["bert"], text)
    config = json.loads((text / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig",
                          "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (text / "config.json").write_text(json.dumps(config))
    code = f"open({str(markers / 'code')!r}, 'w').write('code was executed')\n"
    (text / "modeling_evil.py").write_text(code + "from transformers import BertModel as EvilModel\n")
    (text / "tokenization_evil.py").write_text(code)
    (text / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(markers / "backbone-pickle")))
    # Pickles planted in the checkpoint folder, where a careless loader might look.
    for name in ("pytorch_model.bin", "optimizer.bin", "training_args.bin", "rng_state.pth"):
        (saved / name).write_bytes(pickle.dumps(Marker(markers / f"planted-{name}")))
    # A copy of the checkpoint whose config asks for remote code, re-signed so its hash matches:
    # what an attacker who rewrote both files would ship.
    signed = tmp_path / "signed"
    shutil.copytree(saved, signed)
    manifest = json.loads((signed / CONFIG_NAME).read_text())
    manifest["model"]["text"]["model_kwargs"] = {"trust_remote_code": True}
    manifest["model"]["text"]["name"] = str(text)
    from safetensors.torch import load_file, save_file
    from lilt._io import sha256_file
    save_file(load_file(signed / WEIGHTS_NAME), str(signed / WEIGHTS_NAME),
              metadata={"format": "pt", "lilt_format": "1", "lilt_config_sha256": config_digest(manifest)})
    manifest["weights"]["sha256"] = sha256_file(signed / WEIGHTS_NAME)
    (signed / CONFIG_NAME).write_text(json.dumps(manifest))
    # An edited copy, not re-signed.
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    manifest = json.loads((edited / CONFIG_NAME).read_text())
    manifest["model"]["text"]["pooling"] = "cls" if model.text.pooling == "mean" else "mean"
    (edited / CONFIG_NAME).write_text(json.dumps(manifest))
    return {"saved": saved, "signed": signed, "edited": edited, "text": text, "markers": markers}


def test_checkpoints_and_backbones_never_run_code_or_unpickle(evil, tmp_path: Path) -> None:
    calls = {
        "planted": {"what": "from_pretrained", "path": str(evil["saved"])},
        "signed": {"what": "from_pretrained", "path": str(evil["signed"])},
        "edited": {"what": "from_pretrained", "path": str(evil["edited"])},
        "evil-backbone": {"what": "from_pretrained", "path": str(evil["saved"]),
                          "kwargs": {"text": str(evil["text"]), "check_backbones": False}},
    }
    results = audited(calls, tmp_path)
    print(json.dumps({k: v for k, v in results.items() if not k.endswith(":opened")}, indent=1))
    assert results["planted"] == "loaded"  # the planted pickles are simply never looked at
    assert results["signed"].startswith("LiltError:") and "trust_remote_code" in results["signed"]
    assert results["edited"].startswith("LiltError:")
    assert "edited after the weights were saved: model.text.pooling" in results["edited"]
    # The evil folder holds the same weights: with the hash check off it loads, as a plain BERT.
    assert results["evil-backbone"] == "loaded"
    assert not list(evil["markers"].iterdir()), "code ran or a pickle was unpickled"
    opened = [p for k, v in results.items() if k.endswith(":opened") for p in v]
    assert not [p for p in opened if p.endswith((".bin", ".pth", ".pkl"))], "a pickle file was opened"
    assert not [p for p in opened if p.endswith("_evil.py")], "a module shipped with the backbone was opened"


def write_png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("bad", ["../outside.png", "{outside}", "../../../../../../etc/passwd",
                                 "sub/../../outside.png"])
def test_a_table_cannot_reach_outside_its_folder(tmp_path: Path, bad: str) -> None:
    outside = write_png(tmp_path / "outside.png", 1)
    write_png(tmp_path / "data" / "inside.png")
    bad = bad.format(outside=outside)
    (tmp_path / "data" / "pairs.csv").write_text(f"image,text\ninside.png,a fine image\n{bad},a bad path\n")
    results = audited({"table": {"what": "load_pairs", "path": str(tmp_path / "data" / "pairs.csv")}}, tmp_path)
    assert results["table"].startswith("LiltError:") and "outside the table's folder" in results["table"]
    assert "row 1" in results["table"] and "allow_outside_root" in results["table"]
    opened = results["table:opened"]
    assert str(outside) not in opened and "/etc/passwd" not in opened


def test_allow_outside_root_is_an_explicit_choice(tmp_path: Path) -> None:
    from lilt.data import load_pairs

    outside = write_png(tmp_path / "outside.png", 1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.csv").write_text("image,text\n../outside.png,an image next door\n")
    data = load_pairs(tmp_path / "data" / "pairs.csv", allow_outside_root=True)
    assert data[0]["image"] == str(outside.resolve())


def test_code_loading_backbone_options_are_config_errors() -> None:
    for key in ("trust_remote_code", "code_revision", "revision", "_commit_hash"):
        with pytest.raises(lilt.ConfigError, match=key):
            lilt.TextConfig(model_kwargs={key: True})
        with pytest.raises(lilt.ConfigError, match=key):
            lilt.VisionConfig(model_kwargs={key: True})
    assert lilt.TextConfig(model_kwargs={"hidden_dropout_prob": 0.0}).model_kwargs == {"hidden_dropout_prob": 0.0}
