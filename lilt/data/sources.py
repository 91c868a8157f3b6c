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

import contextlib
import glob
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import datasets
import pyarrow as pa

from ..errors import DataError, did_you_mean
from .emoji_cldr import load_emoji_cldr
from .selection import select_pairs
from .tiny import load_tiny_random

BUILTINS = ("emoji-cldr", "tiny-random")
SPLITS = ("train", "validation", "test")
_TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WDS_TEXT_KEYS = ("txt", "text", "caption")


def load_pairs(spec: str | os.PathLike, split: str = "train", *, image_column: str = "image",
               text_column: str = "text", lang_column: str = "lang", langs: Sequence[str] | None = None,
               pairs_per_lang: int | Mapping[str, int] | None = None, max_pairs: int | None = None,
               streaming: bool = False, seed: int = 0, allow_outside_root: bool = False, captions: bool = True,
               **options: Any) -> datasets.Dataset | datasets.IterableDataset:
    """Image-caption pairs from a spec, as a Dataset (IterableDataset when streaming) with image/text[/lang].

    A table's image paths are read relative to the table's folder and must stay inside it (no '../', no
    absolute paths elsewhere) unless `allow_outside_root`: a table cannot make lilt open arbitrary files.
    A table may hold one row per caption (an image's English and Swahili captions on two rows, told apart
    by `lang`): evaluation and training group rows by image. A column named other than its default must
    exist; `captions=False` reads images alone when the source has no caption column.
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        named = {k: v for k, v in (("image_column", image_column), ("text_column", text_column),
                                   ("lang_column", lang_column)) if v != k.split("_")[0]}
        if named:
            raise DataError(f"{spec!r} has fixed columns image, text, lang; {', '.join(named)} name the columns of "
                            "your own folders and tables.")
        name, _, spec_split = spec[len("builtin:"):].partition(":")
        return _builtin(name, spec_split or split, langs=langs, pairs_per_lang=pairs_per_lang,
                        max_pairs=max_pairs, seed=seed, **options)
    if options:
        raise DataError(f"options {sorted(options)} only apply to builtin sources; {spec!r} is not one.")
    with quiet_local_loads(spec):
        data = _read(spec, split, streaming, allow_outside_root)
        data = _rename(data, spec, {image_column: "image", text_column: "text", lang_column: "lang"},
                       allow_outside_root, required=("image", "text") if captions else ("image",))
        return select_pairs(data, langs=langs, pairs_per_lang=pairs_per_lang if split == "train" else None,
                            max_pairs=max_pairs, seed=seed)


@contextlib.contextmanager
def quiet_local_loads(spec: str) -> Iterator[None]:
    """No datasets progress bars ("Downloading data", "Generating train split", "Map") while reading local files.

    They describe copying a file that is already on disk into the cache; a hub download keeps its bar.
    """
    local = Path(spec).exists() or bool(_shards(spec))
    if not local or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


class MissingSplit(DataError):
    """A source has no split of the name asked for (validation falls back on this; other callers report it)."""


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
    with quiet_local_loads(str(spec)):
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
                   {image_column: "image", "text": "text"}).rename_column("text", "label")
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


def _builtin(name: str, split: str, *, langs: Sequence[str] | None, pairs_per_lang: Any, max_pairs: int | None,
             seed: int, **options: Any) -> datasets.Dataset:
    if name == "emoji-cldr":
        caps = pairs_per_lang if split == "train" else None
        # "all": every split in one table with a `split` column (to curate or embed the whole set, not to train).
        data = load_emoji_cldr(split=None if split == "all" else split, langs=langs, pairs_per_lang=caps, seed=seed,
                               **options)
        return select_pairs(data, max_pairs=max_pairs)
    if name == "tiny-random":
        data = load_tiny_random(split=split, seed=seed, **options)
        return select_pairs(data, langs=langs, pairs_per_lang=pairs_per_lang if split == "train" else None,
                            max_pairs=max_pairs, seed=seed)
    raise DataError(f"unknown built-in dataset {name!r}; built-ins: "
                    f"{', '.join('builtin:' + b for b in BUILTINS)}.{did_you_mean(name, BUILTINS)}")


def _read(spec: str, split: str, streaming: bool,
          allow_outside_root: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    path = Path(spec)
    shards = _shards(spec)
    if shards:
        if split != "train":
            raise MissingSplit(f"webdataset shards {spec!r} are one split, 'train', not {split!r}; give the other "
                               "split as shards of their own (e.g. data.val_source).")
        data = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        return _from_webdataset(data, spec)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data = datasets.load_from_disk(str(path))
        data = _pick_split(data, split, spec)
        return data.to_iterable_dataset() if streaming else data
    if path.is_dir() and any((path / f"metadata.{ext}").exists() for ext in ("jsonl", "csv", "parquet")):
        data = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
        data = _pick_split(data, split, spec).cast_column("image", datasets.Image(decode=False))
        # metadata's file_name may say '../x.png' too: the same containment as a table's paths
        return data.map(_TablePaths(path, allow_outside_root, spec), batched=True, with_indices=True)
    if path.is_file() and path.suffix.lower() in _TABLE_FORMATS:
        if split != "train":  # a table is one split; silently reading it for 'validation' would score training data
            raise MissingSplit(f"{spec!r} is one table: its only split is 'train', not {split!r}; give the other "
                               "split as a table of its own (e.g. data.val_source) or split it with data.val_fraction.")
        return _read_table(path, streaming)  # relative image paths are resolved once named `image` (_rename)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise DataError(f"cannot read pairs from {spec!r}: expected a folder with metadata.jsonl/csv, a folder "
                        "written by save_to_disk, a .csv/.tsv/.jsonl/.parquet file, or webdataset .tar shards.")
    data = datasets.load_dataset(spec, streaming=streaming)  # a hub dataset, for users who have a hub
    return _pick_split(data, split, spec)


def _read_table(path: Path, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """A CSV/TSV/JSON(L)/Parquet table; text that is not UTF-8 is kept with U+FFFD (a counted bad caption)."""
    kind = _TABLE_FORMATS[path.suffix.lower()]
    extra: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if kind in ("csv", "json"):
        extra["encoding_errors"] = "replace"
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming, **extra)
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as err:
        if kind != "json" or streaming:
            raise DataError(f"cannot read the table {str(path)!r}: {err.__cause__ or err}") from None
    # pyarrow's JSON reader stops at the first byte that is not UTF-8; read it line by line instead.
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        rows = json.loads(text) if path.suffix.lower() == ".json" else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
        return datasets.Dataset.from_list(rows)
    except (json.JSONDecodeError, TypeError, ValueError, pa.ArrowException) as err:
        raise DataError(f"cannot read the table {str(path)!r}: {err}") from None


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
            raise MissingSplit(f"{spec!r} has no split {split!r}; its splits: {', '.join(data)}."
                               f"{did_you_mean(split, list(data))}")
        return data[split]
    if split != "train":  # one table: reading it for 'validation' or 'test' would silently score training data
        raise MissingSplit(f"{spec!r} holds one split ('train'), not {split!r}.")
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
    """Resolve a table's image paths against its own folder, refusing any outside it (picklable for datasets.map)."""

    def __init__(self, base: Path, allow_outside: bool, spec: str) -> None:
        self.base, self.allow_outside, self.spec = os.path.realpath(base), allow_outside, spec

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        paths = []
        for row, value in zip(indices, batch["image"]):
            path = value.get("path") if isinstance(value, dict) else value
            if not isinstance(path, str) or not path:
                paths.append(value)
                continue
            full = os.path.realpath(os.path.join(self.base, path))  # an absolute `path` replaces the base
            if not self.allow_outside and os.path.commonpath([full, self.base]) != self.base:
                raise DataError(f"{self.spec!r} row {row}: image {path!r} lies outside the table's folder "
                                f"{self.base}; move the images under it, or set data.allow_outside_root: true if "
                                "you trust the table.")
            paths.append({**value, "path": full} if isinstance(value, dict) else full)
        batch["image"] = paths
        return batch


def _rename(data: Any, spec: str, names: dict[str, str], allow_outside_root: bool = False,
            required: Sequence[str] = ("image", "text")) -> Any:
    """Name the source's columns image/text/lang; a column named other than its default must exist."""
    columns = list(data.column_names or [])
    for source, target in names.items():
        if source != target and source not in columns:
            raise DataError(f"{spec!r} has no column {source!r} ({target}_column={source}); its columns: {columns}."
                            f"{did_you_mean(source, columns)}")
    for needed in required:
        source = next(s for s, t in names.items() if t == needed)
        if source not in columns:
            raise DataError(f"{spec!r} has no {needed} column (columns: {columns}); name yours with "
                            f"{needed}_column=....{did_you_mean(needed, columns)}")
    # The named columns only: a `text` column that text_column=caption_sw does not pick is dropped, not kept.
    keep = {source: target for source, target in names.items() if source in columns}
    data = data.select_columns(list(keep))
    data = data.rename_columns({s: t for s, t in keep.items() if s != t}) if any(s != t for s, t in keep.items()) \
        else data
    if Path(spec).is_file() and Path(spec).suffix.lower() in _TABLE_FORMATS:
        data = data.map(_TablePaths(Path(spec).resolve().parent, allow_outside_root, spec), batched=True,
                        with_indices=True)
    return data.select_columns([c for c in ("image", "text", "lang") if c in keep.values()])
