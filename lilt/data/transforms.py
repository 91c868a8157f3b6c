"""Image transforms from the vision tower's timm data config, and the collate function of a pair batch.

Images are decoded in the collate function (so in DataLoader workers), not by `datasets`: a corrupt
or missing file then becomes a counted, named skip instead of an exception deep inside a worker.
Augmentation is seeded per sample from (seed, epoch, row), so a batch is the same whether the run
was resumed, how many workers load it, or how many processes train.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import timm.data
import torch
from PIL import Image

AUGMENTATIONS = ("none", "crop-flip", "crop", "style", "randaugment", "stacked-randaugment")
# timm auto-augment strings: RandAugment with 2 ops at magnitude 9 (timm's ImageNet default), and
# a stronger stacked variant (3 ops at timm's top magnitude) after Scaling Down CLIP's "stacked RA".
# Not the "inc1" op set: its posterize keeps 0 bits near the top magnitude, which Pillow >= 11 refuses
# (every such image failed as unreadable: 58 of 400 with the earlier rand-m15-n3-mstd1.0-inc1).
_RAND_AUGMENT = {"randaugment": "rand-m9-n2-mstd0.5", "stacked-randaugment": "rand-m10-n3-mstd0.5"}


def image_transform(data_config: Mapping[str, Any], augment: str = "none", train: bool = True) -> Callable:
    """timm preprocessing for a tower's data config: eval = resize + center crop; train = the chosen preset."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}.")
    config = dict(data_config)
    if not train or augment == "none":
        return timm.data.create_transform(**config, is_training=False)
    if augment == "style":
        return _style_transform(config)
    # "crop" drops the flip: a mirrored "left arrow" or "person walking facing right" is a wrong caption.
    return timm.data.create_transform(
        **config, is_training=True, hflip=0.0 if augment == "crop" else 0.5, color_jitter=None, re_prob=0.0,
        auto_augment=_RAND_AUGMENT.get(augment), scale=(0.5, 1.0) if augment in ("crop-flip", "crop") else (0.08, 1.0))


def ssl_view_transform(data_config: Mapping[str, Any], preset: str = "simclr") -> Callable:
    """The augmentation of SLIP's two extra views: SimCLR's (as SLIP uses it) or a DataConfig.augment preset."""
    if preset != "simclr":
        return image_transform(data_config, preset, train=True)
    # SimCLR (Chen et al. 2020) / SLIP: crop 8-100%, flip, colour jitter 0.4/0.4/0.4/0.1 at p=0.8, grayscale
    # at p=0.2, blur at p=0.5; timm builds it from its own options.
    return timm.data.create_transform(
        **dict(data_config), is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=(0.4, 0.4, 0.4, 0.1),
        color_jitter_prob=0.8, grayscale_prob=0.2, gaussian_blur_prob=0.5, auto_augment=None, re_prob=0.0)


class _Filter:
    """A PIL ImageFilter as a transform (torchvision has no stroke-width or edge ops)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(self.make())


def _style_transform(config: Mapping[str, Any]) -> Callable:
    """Changes of drawing style, not of meaning: stroke width, edges, blur, posterize, light colour shifts.

    No flip (direction is part of many names) and no hue shift or grayscale (colour is part of many
    names: "red heart", "green apple"); small rotations and rescales on the white canvas the images have.
    """
    from PIL import ImageFilter
    from torchvision import transforms as T

    strokes = T.RandomChoice([_Filter(lambda: ImageFilter.MinFilter(3)), _Filter(lambda: ImageFilter.MaxFilter(3)),
                              _Filter(lambda: ImageFilter.EDGE_ENHANCE_MORE), _Filter(lambda: ImageFilter.SMOOTH_MORE),
                              _Filter(lambda: ImageFilter.DETAIL)])
    style = T.Compose([
        T.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.75, 1.05), fill=(255, 255, 255)),
        T.RandomApply([strokes], p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4)], p=0.8),
        T.RandomPosterize(bits=3, p=0.2),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
    ])
    return T.Compose([style, timm.data.create_transform(**config, is_training=False)])


def decode_image(value: Any) -> Image.Image:
    """A PIL RGB image from what a pair source holds: PIL image, {'bytes', 'path'} dict, path or bytes."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("image entry has neither bytes nor a path")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    image.load()  # decode now, inside the try of the caller: truncated files fail here
    if image.mode == "P" or image.mode == "RGBA" or image.mode == "LA":
        # Composite transparency on white (emoji, logos) rather than on black garbage.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def describe(value: Any, row: Any) -> str:
    """A short name for a bad item: its file path when it has one, else its row."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, str):
        return value
    return f"row {row}"


@dataclass
class PairCollator:
    """Decode, transform and tokenize a list of pairs; skip and name the bad ones."""

    transform: Callable[[Image.Image], torch.Tensor]
    tokenize: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None  # None: images only
    seed: int = 0
    image_column: str = "image"
    text_column: str = "text"
    extra_columns: tuple[str, ...] = field(default=("lang",))
    # SLIP: two more views of each image by this transform, as `ssl_views` (batch, 2, 3, H, W); None: none.
    views: Callable[[Image.Image], torch.Tensor] | None = None

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch: pixel_values, input_ids, attention_mask, kept rows, and the names of skipped items."""
        pixels, texts, keep, bad, views = [], [], [], [], []
        for item in items:
            row = item.get("__row__")
            text = item.get(self.text_column)
            if self.tokenize is not None and (not isinstance(text, str) or not text.strip()):
                bad.append(f"{describe(item.get(self.image_column), row)} (empty caption)")
                continue
            if self.tokenize is not None and "\ufffd" in text:  # how a table reader keeps bytes that are not UTF-8
                bad.append(f"{describe(item.get(self.image_column), row)} (caption is not valid UTF-8)")
                continue
            try:
                image = decode_image(item.get(self.image_column))
                with _seeded(self.seed, item.get("__epoch__", 0), row):
                    pixel = self.transform(image)
                if self.views is not None:
                    views.append(torch.stack(ssl_views(self.views, image, self.seed, item.get("__epoch__", 0), row)))
                pixels.append(pixel)
            except Exception as error:  # any undecodable image is data, not a bug: count it and go on
                bad.append(f"{describe(item.get(self.image_column), row)} ({type(error).__name__}: {error})"[:300])
                continue
            texts.append(text)
            keep.append(item)
        batch: dict[str, Any] = {"bad": bad, "seen": len(items)}
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
            if views:
                batch["ssl_views"] = torch.stack(views)
            if self.tokenize is not None:
                batch.update(self.tokenize(texts))
        batch["rows"] = torch.tensor([-1 if i.get("__row__") is None else i["__row__"] for i in keep])
        for column in self.extra_columns:
            batch[column] = [i.get(column) for i in keep]
        return batch


def ssl_views(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int, epoch: int,
              row: Any) -> list[torch.Tensor]:
    """SLIP's two views of one image, each from its own stream of (seed, epoch, row): unlike each other and the
    main view, and the same whenever they are drawn again (a resumed run)."""
    out = []
    for stream in (1, 2):
        with _seeded(seed, epoch, row, stream):
            out.append(transform(image))
    return out


class _seeded:
    """Seed python, numpy and torch RNGs for one sample and restore them afterwards.

    timm's RandAugment draws from `random` and `numpy`, torchvision's crops from torch; restoring the
    state keeps the training loop's own random stream (dropout) independent of data loading.
    """

    def __init__(self, seed: int, epoch: int, row: Any, stream: int = 0) -> None:
        # Stream 0 is the main view, seeded as it always was; SLIP's views take streams 1 and 2.
        key = (seed, epoch, row) if stream == 0 else (seed, epoch, row, stream)
        self.seed = hash(key) & 0x7FFFFFFF if row is not None else None

    def __enter__(self) -> None:
        if self.seed is None:
            return
        self.state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.random.default_generator.manual_seed(self.seed)  # CPU only: CUDA dropout streams stay

    def __exit__(self, *exc: Any) -> None:
        if self.seed is None:
            return
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.random.set_rng_state(self.state[2])
