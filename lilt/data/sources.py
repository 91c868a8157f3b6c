"""Pair sources: every kind of image-caption data a user has, as a `datasets` table with `image`, `text`, `lang`.

Specs `load_pairs` understands:
- `builtin:emoji-cldr[:split]` - real multilingual pairs from two Debian packages (emoji x CLDR names);
- `builtin:tiny-random[:split]` - random images and captions, for tests;
- a folder holding `metadata.jsonl`/`metadata.csv` next to its images (datasets' `imagefolder`);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a `.csv`/`.tsv`/`.jsonl`/`.json`/`.parquet` file of (image path, caption), paths relative to the file;
- webdataset shards: a `.tar` file, a glob of them, or a folder of them (`.jpg`/`.png` + `.txt`; streamed);
- anything else is a dataset name on the Hugging Face Hub (for users who have one).
Images stay undecoded (`Image(decode=False)` or a path) until the collate function reads them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import numpy as np

from ..config import DataError, did_you_mean

BUILTINS = ("emoji-cldr", "tiny-random")
SPLITS = ("train", "validation", "test")
_TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WDS_TEXT_KEYS = ("txt", "text", "caption")


def load_pairs(spec: str | os.PathLike, split: str = "train", *, image_column: str = "image",
               text_column: str = "text", lang_column: str = "lang", langs: Sequence[str] | None = None,
               pairs_per_lang: int | Mapping[str, int] | None = None, max_pairs: int | None = None,
               streaming: bool = False, seed: int = 0, **options: Any) -> datasets.Dataset | datasets.IterableDataset:
    """Image-caption pairs from a spec, as a Dataset (IterableDataset when streaming) with image/text[/lang]."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name, _, spec_split = spec[len("builtin:"):].partition(":")
        return _builtin(name, spec_split or split, langs=langs, pairs_per_lang=pairs_per_lang,
                        max_pairs=max_pairs, seed=seed, **options)
    if options:
        raise DataError(f"options {sorted(options)} only apply to builtin sources; {spec!r} is not one.")
    data = _read(spec, split, streaming)
    data = _rename(data, spec, {image_column: "image", text_column: "text", lang_column: "lang"})
    return select_pairs(data, langs=langs, pairs_per_lang=pairs_per_lang if split == "train" else None,
                        max_pairs=max_pairs, seed=seed)


def load_labelled(spec: str | os.PathLike, split: str = "train", *, image_column: str = "image",
                  label_column: str = "label", names: Sequence[str] | None = None) -> datasets.Dataset:
    """Labelled images (zero-shot classification, linear probes): columns image and label (a ClassLabel).

    Besides the pair sources, a folder of class subfolders works (datasets' imagefolder: the folder names
    become the class names). Integer labels are kept as they are; string labels become classes in sorted
    order, or in the order of `names` (pass the training split's names to encode a test split alike).
    """
    if str(spec).startswith("builtin:") or _shards(str(spec)):
        raise DataError(f"{str(spec)!r} holds image-caption pairs, not labelled images; zero-shot on "
                        "builtin:emoji-cldr is built in (lilt eval --task zeroshot), and a linear probe needs a "
                        "folder of class subfolders or a table with a label column.")
    path = Path(spec)
    if path.is_dir() and not any((path / f"metadata.{ext}").exists() for ext in ("jsonl", "csv", "parquet")) \
            and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        data = _pick_split(datasets.load_dataset("imagefolder", data_dir=str(path)), split, str(spec))
        data = data.cast_column("image", datasets.Image(decode=False))
    else:
        data = _read(str(spec), split, streaming=False)
    columns = list(data.column_names)
    for needed, flag in ((image_column, "image_column"), (label_column, "label_column")):
        if needed not in columns:
            raise DataError(f"{str(spec)!r} has no {needed!r} column (columns: {columns}); name yours with "
                            f"{flag}=....{did_you_mean(needed, columns)}")
    data = data.select_columns([image_column, label_column])
    data = _rename(data.rename_columns({label_column: "text"}) if label_column != "text" else data, str(spec),
                   {image_column: "image"}).rename_column("text", "label")
    return _encode_labels(data, names, str(spec))


def _encode_labels(data: datasets.Dataset, names: Sequence[str] | None, spec: str) -> datasets.Dataset:
    feature = data.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        current = feature.names
        if names is None or list(current) == list(names):
            return data
        data = data.cast_column("label", datasets.Value("string")).map(
            lambda b: {"label": [current[int(x)] for x in b["label"]]}, batched=True)
        feature = data.features["label"]
    if feature.dtype.startswith("int"):
        labels = data["label"]
        count = len(names) if names is not None else max(labels) + 1
        if min(labels) < 0 or max(labels) >= count:
            raise DataError(f"{spec!r}: integer labels must lie in 0..{count - 1}; found {min(labels)}..{max(labels)}.")
        label_names = list(names) if names is not None else [str(i) for i in range(count)]
        return data.cast_column("label", datasets.ClassLabel(names=label_names))
    values = sorted(set(data["label"]))
    label_names = list(names) if names is not None else values
    unknown = sorted(set(values) - set(label_names))
    if unknown:
        raise DataError(f"{spec!r}: labels {unknown[:5]} are not among the {len(label_names)} classes of the "
                        "training split; a probe cannot score classes it never saw.")
    return data.cast_column("label", datasets.ClassLabel(names=label_names))


def select_pairs(data: datasets.Dataset | datasets.IterableDataset, *, langs: Sequence[str] | None = None,
                 pairs_per_lang: int | Mapping[str, int] | None = None, max_pairs: int | None = None,
                 seed: int = 0) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the given languages, at most `pairs_per_lang` rows of each (seeded), at most `max_pairs` rows."""
    if (langs or pairs_per_lang) and "lang" not in data.column_names:
        raise DataError(f"langs/pairs_per_lang need a language column; this source has {data.column_names}. "
                        "Name it with lang_column=...")
    if langs:
        wanted = set(langs)
        data = data.filter(lambda batch: [x in wanted for x in batch["lang"]], batched=True)
    if pairs_per_lang is not None:
        if isinstance(data, datasets.IterableDataset):
            raise DataError("pairs_per_lang needs a map-style dataset; it cannot cap a streamed source.")
        data = data.select(_capped_rows(np.asarray(data["lang"]), pairs_per_lang, seed))
    if max_pairs is not None:
        data = data.take(max_pairs) if isinstance(data, datasets.IterableDataset) else \
            data.select(range(min(max_pairs, len(data))))
    return data


def _capped_rows(langs: np.ndarray, caps: int | Mapping[str, int], seed: int) -> list[int]:
    """Row indices keeping at most caps[lang] rows per language, chosen by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(langs))
    keep = np.ones(len(langs), dtype=bool)
    for lang in np.unique(langs):
        cap = caps if isinstance(caps, int) else caps.get(str(lang))
        if cap is None:
            continue
        rows = order[langs[order] == lang]
        keep[rows[cap:]] = False
    return np.flatnonzero(keep).tolist()


def _builtin(name: str, split: str, *, langs: Sequence[str] | None, pairs_per_lang: Any, max_pairs: int | None,
             seed: int, **options: Any) -> datasets.Dataset:
    if name == "emoji-cldr":
        from .emoji_cldr import load_emoji_cldr
        caps = pairs_per_lang if split == "train" else None
        data = load_emoji_cldr(split=split, langs=langs, pairs_per_lang=caps, seed=seed, **options)
        return select_pairs(data, max_pairs=max_pairs)
    if name == "tiny-random":
        from .tiny import load_tiny_random
        data = load_tiny_random(split=split, seed=seed, **options)
        return select_pairs(data, langs=langs, pairs_per_lang=pairs_per_lang if split == "train" else None,
                            max_pairs=max_pairs, seed=seed)
    raise DataError(f"unknown built-in dataset {name!r}; built-ins: "
                    f"{', '.join('builtin:' + b for b in BUILTINS)}.{did_you_mean(name, BUILTINS)}")


def _read(spec: str, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    path = Path(spec)
    shards = _shards(spec)
    if shards:
        data = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        return _from_webdataset(data, spec)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data = datasets.load_from_disk(str(path))
        data = _pick_split(data, split, spec)
        return data.to_iterable_dataset() if streaming else data
    if path.is_dir() and any((path / f"metadata.{ext}").exists() for ext in ("jsonl", "csv", "parquet")):
        data = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
        data = _pick_split(data, split, spec)
        return data.cast_column("image", datasets.Image(decode=False))
    if path.is_file() and path.suffix.lower() in _TABLE_FORMATS:
        kind = _TABLE_FORMATS[path.suffix.lower()]
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        data = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming, **extra)
        return data  # relative image paths are resolved once the column has its final name (_rename)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise DataError(f"cannot read pairs from {spec!r}: expected a folder with metadata.jsonl/csv, a folder "
                        "written by save_to_disk, a .csv/.tsv/.jsonl/.parquet file, or webdataset .tar shards.")
    data = datasets.load_dataset(spec, streaming=streaming)  # a hub dataset, for users who have a hub
    return _pick_split(data, split, spec)


def _shards(spec: str) -> list[str]:
    if any(ch in spec for ch in "*?["):
        return sorted(f for f in glob.glob(spec) if f.endswith(".tar"))
    path = Path(spec)
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir() and not (path / "dataset_info.json").exists():
        return sorted(str(p) for p in path.glob("*.tar"))
    return []


def _pick_split(data: Any, split: str, spec: str) -> Any:
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in data:
            raise DataError(f"{spec!r} has no split {split!r}; its splits: {', '.join(data)}."
                            f"{did_you_mean(split, list(data))}")
        return data[split]
    return data


def _from_webdataset(data: datasets.IterableDataset, spec: str) -> datasets.IterableDataset:
    """Name the first image and caption extensions present `image` and `text`, the rest dropped."""
    columns = list(data.features or {}) if data.features else list(next(iter(data)).keys())
    image = next((c for c in _WDS_IMAGE_KEYS if c in columns), None)
    text = next((c for c in _WDS_TEXT_KEYS if c in columns), None)
    if image is None or text is None:
        raise DataError(f"webdataset shards {spec!r} hold keys {columns}; need an image ({'/'.join(_WDS_IMAGE_KEYS)}) "
                        f"and a caption ({'/'.join(_WDS_TEXT_KEYS)}) per sample.")
    data = data.rename_columns({image: "image", text: "text"})
    data = data.remove_columns([c for c in columns if c not in (image, text, "__key__")])
    return data.cast_column("image", datasets.Image(decode=False))


class _TablePaths:
    """Resolve image paths in a table relative to the table's own folder (picklable for datasets.map)."""

    def __init__(self, base: Path) -> None:
        self.base = str(base)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch["image"] = [p if p is None or os.path.isabs(p) else os.path.join(self.base, p) for p in batch["image"]]
        return batch


def _rename(data: Any, spec: str, names: dict[str, str]) -> Any:
    columns = list(data.column_names or [])
    for source, target in names.items():
        if source == target or source not in columns:
            continue
        data = data.rename_column(source, target)
        columns = [target if c == source else c for c in columns]
    for needed, flag in (("image", "image_column"), ("text", "text_column")):
        if needed not in columns:
            raise DataError(f"{spec!r} has no {needed} column (columns: {columns}); name yours with "
                            f"{flag}=....{did_you_mean(needed, columns)}")
    if Path(spec).is_file() and Path(spec).suffix.lower() in _TABLE_FORMATS:
        data = data.map(_TablePaths(Path(spec).resolve().parent), batched=True)
    return data.select_columns([c for c in ("image", "text", "lang") if c in columns])
