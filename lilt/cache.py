"""Training feature cache (`train.cache: auto`): the frozen towers' pooled features computed once per run.

A heads-only plan (both towers locked, only the projection heads and temperature train) recomputes the
same tower outputs every step. With the cache, the pooled features of each caption and of each (image,
view) are computed once, in eval mode, written as one safetensors file and memory-mapped back; training
then runs the heads alone on rows looked up by the same sampler, so data order, skipped items and resume
are those of an uncached run. When the text tower is locked and the vision tower trains only blocks after
a frozen prefix (`unlock top:k`, `deep`, norms of the top blocks), the cache keeps the hidden states that
enter the first trainable vision block instead, and training runs the rest of the tower. The text tower
likewise: locked, its pooled features; training only after a frozen prefix of layers (`deep`, `unlock
top:k`), each caption's token states entering its first trainable layer with the caption's length (the
batch's attention mask is rebuilt from the lengths, padded to the batch's longest as tokenization pads it);
training from its embeddings on (LiT, norms everywhere), not cached: its batches carry tokens.

Views: with `train.cache_views: K` each image is cached under K augmentations, view v drawn with the
per-sample seed (seed, v, row of the image's first caption); the view an item uses at an epoch is a
seeded function of (seed, epoch, row) mod K. With `data.augment: none` every view is the same and a
cached run gives an uncached run's weights (to float rounding of batched forwards) when the frozen towers
have no dropout; with augmentation or tower dropout it trains on K fixed views / dropout-free features
instead of fresh draws.

The file's name is a sha256 over what decides its contents (lilt version, each backbone's weights hash
and config, the image transform and augmentation, K and the seed when views differ, the prefix depth,
and every row's image identity and caption), so a changed transform, backbone or data never reads a
stale cache. One process only for now: a run on several refuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from ._io import atomic_path, lilt_home
from .config import DataConfig, TrainConfig
from .cpu_memory import keeps_freed_memory
from .data.identity import image_ids, image_keys
from .data.transforms import _seeded, decode_image, describe, image_transform
from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CachedCollator", "FeatureCache", "build_cache", "cache_folder", "cache_refusal", "view_of"]

HEADS = ("vision_proj", "text_proj", "logit_scale", "logit_bias")


def vision_depth(model: torch.nn.Module) -> int | None:
    """Cached vision depth: None for the pooled output (the tower is frozen), else the frozen blocks cached."""
    if not any(p.requires_grad for p in model.vision.parameters()):
        return None
    return model.vision.frozen_prefix_depth()


def text_cached(model: torch.nn.Module) -> bool:
    """Whether the captions' pooled features are cached (the text tower is locked)."""
    return not any(p.requires_grad for p in model.text.parameters())


def text_depth(model: torch.nn.Module) -> int | None:
    """Frozen text layers whose token states are cached, when the tower trains only after them; else None
    (locked: pooled features are cached; training from the embeddings on: the tower runs each step)."""
    return None if text_cached(model) else model.text.frozen_prefix_depth()


def _text_mode(model: torch.nn.Module) -> str:
    depth = text_depth(model)
    return "pooled" if text_cached(model) else ("live" if depth is None else f"text-tokens:{depth}")


def cache_refusal(model: torch.nn.Module, config: TrainConfig, data_config: DataConfig, data: Any) -> str | None:
    """Why this run cannot train on cached features (None: it can): the vision tower must be locked or trained
    only after a frozen prefix of blocks (the text tower is cached when locked, else it runs each step)."""
    towers = HEADS + ("vision", "text")
    trains = [n for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in towers]
    vision = model.config.vision
    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    reasons = [
        (bool(trains), f"parameters outside the towers and heads train ({trains[0] if trains else ''})"),
        (vision_trains and model.vision.frozen_prefix_depth() is None, "the vision tower's stem trains, so no "
                                                                       "frozen prefix can be cached"),
        (getattr(model, "shared_encoder", None) is not None, "the model has a grown shared encoder"),
        (bool(config.growth), "growth stages change the model during the run"),
        (bool(config.ssl_weight), "SLIP (ssl_weight) runs the vision tower on fresh views"),
        (data_config.parallel is not None and bool(config.parallel_weight), "parallel text runs the text tower"),
        (isinstance(data, datasets.IterableDataset), "a streamed source cannot be cached ahead"),
        (bool(vision.mask_ratio), "FLIP patch dropping (vision.mask_ratio) draws new patches every step"),
        (not vision.freeze_bn_stats, "BatchNorm statistics train (vision.freeze_bn_stats: false)")]
    return next((why for bad, why in reasons if bad), None)


def view_of(seed: int, epoch: int, row: int, views: int) -> int:
    """Which of the K cached views row `row` uses at `epoch` (seeded, so a resumed epoch draws the same)."""
    if views == 1:
        return 0
    # sha256, not hash(): a str in a hashed tuple would be salted per process (PYTHONHASHSEED).
    digest = hashlib.sha256(f"view:{seed}:{epoch}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % views


def cache_folder(config: TrainConfig) -> Path:
    """Where feature caches live: train.cache_dir, 'home' for $LILT_HOME/cache, else <output_dir>/feature-cache."""
    if config.cache_dir == "home":
        return lilt_home() / "cache"
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "feature-cache"


def _sha(items: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module, data: datasets.Dataset, config: TrainConfig, augment: str) -> dict[str, str]:
    """Everything that decides the cache's contents, as strings (the file's metadata; its hash is its name)."""
    views = config.cache_views if augment != "none" else 1  # without augmentation all views are one
    return {
        "lilt_version": __version__, "dtype": "float32",
        "depth": "pooled" if vision_depth(model) is None else f"vision-blocks:{vision_depth(model)}",
        "vision_sha256": model.vision.backbone_sha256, "vision_config": model.config.vision.to_json(),
        "transform": json.dumps({k: str(v) for k, v in sorted(dict(model.vision.data_config).items())}),
        "augment": augment, "views": str(views), "view_seed": str(config.seed if views > 1 else ""),
        "text_sha256": model.text.backbone_sha256, "text_config": model.config.text.to_json(),
        "text_depth": _text_mode(model),
        "images": _sha(image_keys(data)), "captions": _sha(data["text"])}


@dataclass
class FeatureCache:
    """Cached pooled features and, per table row, where its image (view 0) and caption sit; bad rows named."""

    images: torch.Tensor  # (images * views, *what the heads or the first trainable block take); image * views + view
    # (captions, text width); after a frozen text prefix, (all their tokens, width), caption after caption
    texts: torch.Tensor
    image_of_row: torch.Tensor  # per table row: image index, -1 for a bad row
    text_of_row: torch.Tensor  # per table row: caption index, -1 for a bad row
    bad: dict[int, str]
    views: int
    path: Path
    depth: int | None = None  # vision blocks run before caching; None: the pooled output
    texts_cached: bool = True  # False: the text tower trains from its embeddings on, so batches carry tokens
    text_depth: int | None = None  # frozen text layers run before caching; None: pooled (or not cached)
    text_lengths: torch.Tensor | None = None  # per caption: its tokens in `texts`

    def __post_init__(self) -> None:
        # Where each caption's tokens start in `texts`.
        self.text_starts = None if self.text_lengths is None else torch.cumsum(self.text_lengths, 0) - self.text_lengths

    @property
    def nbytes(self) -> int:
        """Size of the feature tensors."""
        return self.images.numel() * self.images.element_size() + self.texts.numel() * self.texts.element_size()

    def to(self, device: torch.device) -> "FeatureCache":
        """The feature tensors on `device` (heads-only training reads them every step)."""
        self.images, self.texts = self.images.to(device), self.texts.to(device)
        if self.text_lengths is not None:
            self.text_lengths, self.text_starts = self.text_lengths.to(device), self.text_starts.to(device)
        return self

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Model inputs for a CachedCollator batch: the pooled features of its images and captions."""
        key = "image_features" if self.depth is None else "image_hidden"
        inputs = {key: self.images[batch["image_index"].to(self.images.device)]}
        index = batch["text_index"].to(self.texts.device)
        if self.text_depth is not None:
            lengths, starts = self.text_lengths[index], self.text_starts[index]
            positions = torch.arange(int(lengths.max()), device=lengths.device)
            mask = positions < lengths[:, None]
            # Padding positions (masked out of attention and pooling) read zeros.
            rows = torch.where(mask, starts[:, None] + positions, 0)
            inputs["text_hidden"] = self.texts[rows] * mask[..., None].to(self.texts.dtype)
            inputs["attention_mask"] = mask.long()
        elif self.texts_cached:
            inputs["text_features"] = self.texts[index]
        else:
            inputs.update({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
        return inputs


@dataclass
class CachedCollator:
    """A batch of cache indices in place of pixels and tokens; bad rows skipped and named as PairCollator does."""

    image_of_row: torch.Tensor
    text_of_row: torch.Tensor
    bad_rows: dict[int, str]
    seed: int
    views: int
    tokenize: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None  # the text tower trains
    extra_columns: tuple[str, ...] = ("lang",)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch: image_index, text_index, kept rows, and the names of skipped items."""
        keep, bad, images, texts = [], [], [], []
        for item in items:
            row, epoch = item["__row__"], item.get("__epoch__", 0)
            if row in self.bad_rows:
                bad.append(self.bad_rows[row])
                continue
            images.append(int(self.image_of_row[row]) * self.views + view_of(self.seed, epoch, row, self.views))
            texts.append(int(self.text_of_row[row]))
            keep.append(item)
        batch: dict[str, Any] = {"bad": bad, "seen": len(items)}
        if keep:
            batch["image_index"], batch["text_index"] = torch.tensor(images), torch.tensor(texts)
            if self.tokenize is not None:
                batch.update(self.tokenize([i["text"] for i in keep]))
        batch["rows"] = torch.tensor([i["__row__"] for i in keep])
        for column in self.extra_columns:
            batch[column] = [i.get(column) for i in keep]
        return batch


def build_cache(model: torch.nn.Module, data: datasets.Dataset, config: TrainConfig, data_config: DataConfig,
                progress: bool = True) -> FeatureCache:
    """Read the run's feature cache, or compute and write it first (size checked against train.cache_max_gb)."""
    meta = fingerprint(model, data, config, data_config.augment)
    views = int(meta["views"])
    prefix = text_depth(model)
    cached_text = text_cached(model) or prefix is not None
    path = cache_folder(config) / f"features-{_sha(sorted(meta.items()))[:24]}.safetensors"
    if not path.is_file():
        ids = image_ids(data)
        # Shortest first: fill batches of similar length pad little (a 12-layer text prefix over padding was
        # half the fill of a deep plan's cache).
        captions = sorted({t for t in data["text"] if isinstance(t, str)}, key=lambda t: (len(t), t)) \
            if cached_text else []
        n_images = int(ids.max()) + 1 if len(ids) else 0
        # Token states: at most max_length per caption (the file holds only real tokens).
        per_caption = model.text_proj.in_features if prefix is None else \
            model.text.max_length * model.text.hidden_size
        size = 4 * (n_images * views * _image_width(model) + len(captions) * per_caption)
        if size > config.cache_max_gb * 1e9:
            raise ConfigError(f"train.cache: the feature cache would take {size / 1e9:.2f} GB, over train.cache_max_gb="
                              f"{config.cache_max_gb}; raise cache_max_gb, lower cache_views, or set train.cache=off.")
        if progress:
            tqdm.write(f"feature cache: {n_images} images x {views} view(s) + {len(captions)} captions = "
                       f"{size / 1e6:.1f} MB -> {path}")
        _fill(model, data, config, data_config, ids, captions, views, meta, path, progress)
    return _read(path, views, vision_depth(model), cached_text, prefix)


def _encode_images(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the cache keeps of a batch of images: pooled features, or the frozen vision prefix's output."""
    depth = vision_depth(model)
    if depth is None:
        return model.image_features(pixels).float().cpu()
    return model.vision.forward_prefix(pixels.to(model.device), depth)[0].float().cpu().contiguous()


def _image_width(model: torch.nn.Module) -> int:
    """Numbers cached per image view (one eval forward of a blank image when a prefix is cached)."""
    if vision_depth(model) is None:
        return model.vision_proj.in_features
    was_training = model.training
    try:
        with torch.no_grad():
            return _encode_images(model.eval(), torch.zeros(1, 3, *transform_size(model)))[0].numel()
    finally:
        model.train(was_training)


@keeps_freed_memory
def _fill(model: torch.nn.Module, data: datasets.Dataset, config: TrainConfig, data_config: DataConfig,
          ids: Any, captions: list[str], views: int, meta: dict[str, str], path: Path, progress: bool) -> None:
    """Compute every image view's and caption's pooled features (eval mode, no gradient) and write them."""
    transform = image_transform(model.vision.data_config, data_config.augment, train=True)
    first: dict[int, int] = {}
    for row, image in enumerate(ids.tolist()):
        first.setdefault(image, row)
    bad_images: dict[int, str] = {}
    image_rows, chunk, batch = [], [], max(1, config.eval_batch_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(first) * views + len(captions), desc="feature cache", unit="item", disable=not progress)
    try:
        with torch.no_grad():
            for image, row in first.items():
                value = data[row]["image"]
                try:
                    pil = decode_image(value)
                    drawn = []
                    for v in range(views):
                        with _seeded(config.seed, v, row):
                            drawn.append(transform(pil))
                except Exception as error:  # as in PairCollator: an undecodable image is data, skipped and named
                    bad_images[image] = f"{describe(value, row)} ({type(error).__name__}: {error})"[:300]
                    drawn = [torch.zeros(3, *transform_size(model))] * views  # keeps later images' positions
                chunk += drawn
                if len(chunk) >= batch:
                    image_rows.append(_encode_images(model, torch.stack(chunk)))
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                image_rows.append(_encode_images(model, torch.stack(chunk)))
                bar.update(len(chunk))
            text_rows, text_lengths = [], []
            for start in range(0, len(captions), batch):
                part = captions[start:start + batch]
                states, lengths = _encode_captions(model, model.tokenize(part))
                text_rows.append(states)
                text_lengths.append(lengths)
                bar.update(len(part))
    finally:
        bar.close()
        model.train(was_training)
    images = torch.cat(image_rows) if image_rows else torch.empty(0, _image_width(model))
    texts = torch.cat(text_rows) if text_rows else torch.empty(0, model.text_proj.in_features)
    index = {c: i for i, c in enumerate(captions)}
    image_of_row, text_of_row, bad = [], [], {}
    for row, (image, text) in enumerate(zip(ids.tolist(), data["text"])):
        reason = _caption_problem(text)
        if reason is not None:
            bad[row] = f"{describe(data[row]['image'], row)} ({reason})"
        elif image in bad_images:
            bad[row] = bad_images[image]
        image_of_row.append(-1 if row in bad else image)
        text_of_row.append(-1 if row in bad else index.get(text, -1))
    if text_depth(model) is not None:
        extra = {"text_lengths": torch.cat(text_lengths) if text_lengths else torch.empty(0, dtype=torch.int64)}
    else:
        extra = {}
    tensors = {"images": images.contiguous(), "texts": texts.contiguous(), **extra,
               "image_of_row": torch.tensor(image_of_row, dtype=torch.int64),
               "text_of_row": torch.tensor(text_of_row, dtype=torch.int64)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, "bad": json.dumps({str(k): v for k, v in bad.items()})})


def _encode_captions(model: torch.nn.Module, tokens: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                          torch.Tensor | None]:
    """What the cache keeps of a batch of captions: pooled features, or the frozen text prefix's states of their
    real tokens, caption after caption (no padding; a left-padding tokenizer reads back as right-padded)."""
    depth = text_depth(model)
    if depth is None:
        return model.text_features(tokens).float().cpu(), None
    tokens = {k: v.to(model.device) for k, v in tokens.items()}
    hidden = model.text.forward_prefix(tokens, depth)[0].float().cpu()
    mask = tokens["attention_mask"].cpu().bool()
    return hidden[mask], mask.sum(1)  # row-major: each caption's tokens in order, then the next caption's


def transform_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) of the vision tower's input."""
    return tuple(model.vision.data_config["input_size"][1:])


def _caption_problem(text: Any) -> str | None:
    """Why PairCollator would skip this caption (None: it would not)."""
    if not isinstance(text, str) or not text.strip():
        return "empty caption"
    if "\ufffd" in text:
        return "caption is not valid UTF-8"
    return None


def _read(path: Path, views: int, depth: int | None, texts_cached: bool, text_depth: int | None) -> FeatureCache:
    """The cache file, memory-mapped (safetensors safe_open)."""
    with safe_open(str(path), framework="pt") as handle:
        bad = {int(k): v for k, v in json.loads(handle.metadata()["bad"]).items()}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return FeatureCache(tensors["images"], tensors["texts"], tensors["image_of_row"], tensors["text_of_row"], bad,
                        views, path, depth, texts_cached, text_depth, tensors.get("text_lengths"))
