"""`builtin:emoji-cldr`: real multilingual image-text pairs built offline from two Debian packages.

Every emoji that Noto Color Emoji draws is rendered once to a PNG and paired with the names people
wrote for it in the Unicode CLDR annotations, in up to 147 locales (`tts` name; optionally each
keyword as an extra caption). Splits are by emoji, so an image never appears in two splits.
Licences: Noto Color Emoji is OFL-1.1; the CLDR data is under the Unicode licence.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
from filelock import FileLock

from .._io import lilt_home
from ..errors import DataError, close_matches
from .selection import capped_rows

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR_DIR = "/usr/share/unicode/cldr/common/annotations"
APT_HINT = "apt-get install -y fonts-noto-color-emoji unicode-cldr-core"
VERSION = 1
SPLITS = ("train", "validation", "test")


class MissingSystemData(DataError):
    """The Debian packages the built-in emoji data is made from are not installed."""


def emoji_cldr_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once, cached, safe against concurrent builds) and return the folder of the emoji-cldr set."""
    root = Path(cache_dir) if cache_dir else lilt_home() / "data" / f"emoji-cldr-v{VERSION}"
    if (root / "meta.json").is_file():
        return root
    missing = [p for p in (FONT_PATH, CLDR_DIR) if not Path(p).exists()]
    if missing:
        raise MissingSystemData(f"builtin:emoji-cldr is built from Debian packages; missing {', '.join(missing)}. "
                                f"Install them with `sudo {APT_HINT}` (`make demo` does it when run as root).")
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "meta.json").is_file():  # another process built it while we waited
            return root
        tmp = Path(tempfile.mkdtemp(prefix=".emoji-cldr-", dir=root.parent))
        try:
            _build(tmp)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _read_annotations(folder: Path) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """locale -> emoji -> (tts name, keywords), skipping CLDR's inheritance marker."""
    out: dict[str, dict[str, tuple[str, list[str]]]] = {}
    for file in sorted(folder.glob("*.xml")):
        names: dict[str, str] = {}
        keywords: dict[str, list[str]] = {}
        for node in ET.parse(file).getroot().iter("annotation"):
            text, cp = (node.text or "").strip(), node.get("cp")
            if not text or text == "↑↑↑" or not cp:
                continue
            if node.get("type") == "tts":
                names[cp] = text
            else:
                keywords[cp] = [k.strip() for k in text.split("|") if k.strip()]
        out[file.stem] = {cp: (name, keywords.get(cp, [])) for cp, name in names.items()}
    return out


def _render(emoji: str, font, blank: bytes | None):
    """The emoji on a white square RGB canvas, or None when the font has no colour glyph for it."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), emoji, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    if blank is not None and glyph.tobytes() == blank:
        return None  # the font's "missing glyph" box
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    return square


def _build(root: Path) -> None:
    from PIL import ImageFont

    start = time.perf_counter()
    annotations = _read_annotations(Path(CLDR_DIR))
    font = ImageFont.truetype(FONT_PATH, 109)  # the colour bitmaps exist at this size only
    missing = _render("\ue000", font, None)  # a private-use codepoint: what "no glyph" looks like
    blank = missing.tobytes() if missing is not None else None
    (root / "images").mkdir(parents=True)
    kept: dict[str, str] = {}
    for emoji in sorted(annotations.get("en", {})):
        image = _render(emoji, font, None)
        if image is None or (blank is not None and _render(emoji, font, blank) is None):
            continue
        path = root / "images" / ("-".join(f"{ord(c):x}" for c in emoji) + ".png")
        image.save(path, optimize=False)
        kept[emoji] = str(path.relative_to(root))
    rows: dict[str, list] = {"emoji": [], "image": [], "lang": [], "name": [], "keywords": []}
    for lang, entries in annotations.items():
        for emoji, (name, words) in entries.items():
            if emoji in kept:
                for key, value in (("emoji", emoji), ("image", kept[emoji]), ("lang", lang), ("name", name),
                                   ("keywords", words)):
                    rows[key].append(value)
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "captions"))
    meta = {"version": VERSION, "emoji": len(kept), "captions": len(rows["emoji"]), "locales": len(annotations),
            "cldr": _package_version("unicode-cldr-core"), "font": _package_version("fonts-noto-color-emoji"),
            "build_seconds": round(time.perf_counter() - start, 1)}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _package_version(name: str) -> str | None:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                              timeout=10).stdout or None
    except (OSError, subprocess.SubprocessError):
        return None


def split_of(emoji: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """emoji -> split: a seeded shuffle of the sorted emoji; test first, then validation, the rest train."""
    ordered = sorted(set(emoji))
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test, n_val = round(test_fraction * len(ordered)), round(val_fraction * len(ordered))
    names = np.array(["train"] * len(ordered), dtype=object)
    names[order[:n_test]] = "test"
    names[order[n_test:n_test + n_val]] = "validation"
    return dict(zip(ordered, names.tolist()))


def load_emoji_cldr(split: str | None = "train", langs: Sequence[str] | None = None,
                    pairs_per_lang: int | Mapping[str, int] | None = None, keywords: bool = False, seed: int = 0,
                    val_fraction: float = 0.1, test_fraction: float = 0.3,
                    cache_dir: str | os.PathLike | None = None, split_seed: int = 0, noise: float = 0.0,
                    noise_seed: int = 0) -> datasets.Dataset:
    """Emoji images paired with their CLDR names (and optionally keywords) in the chosen languages.

    `seed` picks the `pairs_per_lang` subsets (a training run passes its own seed); `split_seed` decides
    which emoji are train, validation and test, and stays fixed unless asked, so that no training seed
    can move a test emoji into training. `noise` > 0 re-pairs that share of the training split's captions
    with wrong images (chosen by `noise_seed`) and adds a boolean `noisy` column: web-scale noise to curate.
    """
    if not 0 <= noise < 1:
        raise DataError(f"builtin:emoji-cldr noise={noise} must be in [0, 1) (the share of training captions "
                        "given a wrong image, e.g. 0.3).")
    if split is not None and split not in SPLITS:
        raise DataError(f"builtin:emoji-cldr has splits {list(SPLITS)}; got {split!r}.")
    root = emoji_cldr_root(cache_dir)
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # selecting a few thousand rows is instant; progress bars would only be noise
        datasets.utils.disable_progress_bars()
    try:
        pairs = _load(root, split, langs, pairs_per_lang, keywords, seed, val_fraction, test_fraction, split_seed)
        return add_noise(pairs, noise, noise_seed, split) if noise else pairs
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()


def _load(root: Path, split: str | None, langs: Sequence[str] | None, pairs_per_lang: int | Mapping[str, int] | None,
          keywords: bool, seed: int, val_fraction: float, test_fraction: float, split_seed: int) -> datasets.Dataset:
    table = datasets.load_from_disk(str(root / "captions"))
    if langs:
        known = set(table.unique("lang"))
        unknown = [lang for lang in langs if lang not in known]
        if unknown:
            hints = {u: close_matches(u, known) for u in unknown}
            raise DataError(f"builtin:emoji-cldr has no locale {unknown} (close: {hints}); it has {len(known)} "
                            f"CLDR locales such as en, sw, yo, am, ha, mr, es, de, zh, ar.")
        wanted = set(langs)
        table = table.filter(lambda b: [x in wanted for x in b["lang"]], batched=True)
    assignment = split_of(table.unique("emoji"), split_seed, val_fraction, test_fraction)
    splits = [assignment[e] for e in table["emoji"]]
    table = table.add_column("split", splits)
    if split is not None:
        table = table.select(np.flatnonzero(np.asarray(splits) == split))
    if split == "train" and pairs_per_lang is not None:
        table = table.select(capped_rows(np.asarray(table["lang"]), pairs_per_lang, seed))
    return _as_pairs(table, root, keywords, keep_split=split is None)


def _as_pairs(table: datasets.Dataset, root: Path, keywords: bool, keep_split: bool) -> datasets.Dataset:
    """Columns image (undecoded, absolute path), text, lang, emoji[, split]; keywords add one row each."""
    base = str(root)

    def expand(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "text": [], "lang": [], "emoji": [], "split": []}
        for i, name in enumerate(batch["name"]):
            texts = [name] + ([k for k in batch["keywords"][i] if k != name] if keywords else [])
            for text in texts:
                out["image"].append({"path": os.path.join(base, batch["image"][i]), "bytes": None})
                out["text"].append(text)
                out["lang"].append(batch["lang"][i])
                out["emoji"].append(batch["emoji"][i])
                out["split"].append(batch["split"][i])
        return out

    features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string"),
                                  "lang": datasets.Value("string"), "emoji": datasets.Value("string"),
                                  "split": datasets.Value("string")})
    pairs = table.map(expand, batched=True, remove_columns=table.column_names, features=features)
    return pairs if keep_split else pairs.remove_columns("split")


def add_noise(pairs: datasets.Dataset, fraction: float, seed: int, split: str | None) -> datasets.Dataset:
    """Give a seeded `fraction` of the training rows another row's (different) image; mark them in `noisy`.

    The chosen rows' images are deranged among themselves: rows are ordered by a random rank of their image
    and each takes the image `m` places further on (cyclically), `m` being the most rows any one image has,
    so no row can get its own image back even when an image has several captions. Other splits stay clean.
    """
    in_train = np.ones(len(pairs), dtype=bool) if split == "train" else \
        (np.asarray(pairs["split"]) == "train") if split is None else np.zeros(len(pairs), dtype=bool)
    candidates = np.flatnonzero(in_train)
    count = int(round(fraction * len(candidates)))
    noisy = np.zeros(len(pairs), dtype=bool)
    images = pairs.select_columns(["image"]).with_format("arrow")[:]["image"].combine_chunks()
    if count >= 2:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        paths = np.asarray(images.field("path").to_pylist(), dtype=object)[chosen]
        _, image_of = np.unique(paths, return_inverse=True)
        rank = rng.permutation(image_of.max() + 1)[image_of]
        order = chosen[np.lexsort((chosen, rank))]
        shift = int(np.bincount(image_of).max())
        if shift * 2 > count:
            raise DataError(f"builtin:emoji-cldr noise={fraction}: one image holds {shift} of the {count} chosen "
                            "captions, too many to give them all another image; raise noise or use more emoji.")
        source = np.arange(len(pairs))
        source[order] = np.roll(order, -shift)
        images = images.take(source)
        noisy[order] = True
    table = pairs.with_format("arrow")[:]
    table = table.set_column(table.schema.get_field_index("image"), "image", images)
    features = datasets.Features({**pairs.features, "noisy": datasets.Value("bool")})
    table = table.append_column("noisy", pa.array(noisy)).cast(features.arrow_schema)
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))
