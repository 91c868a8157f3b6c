"""Parallel text: (pivot sentence, its translation) pairs for a text-to-text alignment term.

Captioned images in a low-resource language are scarce; translations of short texts are cheap. A batch
of parallel pairs each step pulls the target-language embedding toward the pivot's (English) embedding
of the same sentence - multilingual distillation (Reimers & Gurevych 2020; M-CLIP, Carlsson et al. 2022) -
so what the image-text pairs teach in English carries over to the other language's words.

Sources (`DataConfig.parallel`):
- `builtin:emoji-cldr`: the CLDR names of **training-split** emoji in the pivot language and each target
  language (never a validation or test emoji: the held-out concepts stay unseen, in every language);
- a `.csv`/`.tsv`/`.jsonl`/`.json`/`.parquet` table with columns `source`, `target` and `lang`.
Batches are a pure function of (seed, step): a resumed run draws exactly the batches the uninterrupted one did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import torch

from ..errors import DataError
from .emoji_cldr import load_emoji_cldr
from .selection import capped_rows

COLUMNS = ("source", "target", "lang")
_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_parallel(spec: str, langs: Sequence[str] | None = None, per_lang: int | Mapping[str, int] | None = None, *,
                  pivot: str = "en", seed: int = 0, options: Mapping[str, Any] | None = None) -> datasets.Dataset:
    """Parallel pairs (source, target, lang) from a built-in set or a table, capped per target language."""
    if spec == "builtin:emoji-cldr":
        table = emoji_parallel(langs, pivot, options or {})
    elif spec.startswith("builtin:"):
        raise DataError(f"DataConfig.parallel={spec!r}: the built-in parallel text is 'builtin:emoji-cldr'.")
    else:
        table = _read_table(Path(spec))
        if langs:
            wanted = set(langs)
            table = table.filter(lambda b: [x in wanted for x in b["lang"]], batched=True)
    if len(table) == 0:
        raise DataError(f"DataConfig.parallel={spec!r} has no pairs in languages {list(langs or [])}.")
    if per_lang is not None:
        table = table.select(capped_rows(np.asarray(table["lang"]), per_lang, seed))
    return table


def parallel_of(data: Any, seed: int = 0) -> datasets.Dataset:
    """The parallel table a DataConfig names (`parallel`, its target languages, caps and pivot)."""
    if data.parallel is None:
        raise DataError("no parallel text: set DataConfig.parallel (e.g. builtin:emoji-cldr, with parallel_langs).")
    return load_parallel(data.parallel, data.parallel_targets(), data.parallel_per_lang, pivot=data.parallel_pivot,
                         seed=seed, options=data.options)


def emoji_parallel(langs: Sequence[str] | None, pivot: str, options: Mapping[str, Any]) -> datasets.Dataset:
    """Names of the training-split emoji in the pivot language next to their names in each target language."""
    if not langs:
        raise DataError("parallel text from builtin:emoji-cldr needs target languages: set DataConfig.parallel_langs "
                        "(e.g. [sw]) or training langs other than the pivot.")
    options = {k: v for k, v in options.items() if k != "keywords"}  # names only: keywords are not translations
    names = load_emoji_cldr("train", langs=[pivot, *[x for x in langs if x != pivot]], **options)
    pivot_name = {e: t for e, t, lang in zip(names["emoji"], names["text"], names["lang"]) if lang == pivot}
    rows: dict[str, list[str]] = {"source": [], "target": [], "lang": [], "emoji": []}
    for emoji, text, lang in zip(names["emoji"], names["text"], names["lang"]):
        if lang != pivot and emoji in pivot_name:
            for key, value in zip(rows, (pivot_name[emoji], text, lang, emoji)):
                rows[key].append(value)
    return datasets.Dataset.from_dict(rows)


def _read_table(path: Path) -> datasets.Dataset:
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise DataError(f"DataConfig.parallel={str(path)!r}: expected 'builtin:emoji-cldr' or an existing "
                        f".csv/.tsv/.jsonl/.parquet file with columns {list(COLUMNS)}.")
    extra: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    table = datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"DataConfig.parallel={str(path)!r} lacks columns {missing}; it has {table.column_names} "
                        f"(need {list(COLUMNS)}: the pivot sentence, its translation, the translation's language).")
    empty = [i for i, (s, t) in enumerate(zip(table["source"], table["target"]))
             if not isinstance(s, str) or not isinstance(t, str) or not s.strip() or not t.strip()]
    if empty:
        raise DataError(f"DataConfig.parallel={str(path)!r}: rows {empty[:5]} have an empty source or target.")
    return table


class ParallelBatches:
    """Tokenized parallel batches by step: a seeded permutation per pass over the pairs, sharded over processes."""

    def __init__(self, table: datasets.Dataset, tokenize: Callable[[Sequence[str]], Mapping[str, torch.Tensor]],
                 batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if len(table) < batch_size:
            raise DataError(f"only {len(table)} parallel pairs for parallel_batch_size={batch_size}; lower "
                            "TrainConfig.parallel_batch_size or give more parallel text.")
        self.source, self.target = list(table["source"]), list(table["target"])
        self.tokenize, self.batch_size, self.seed, self.rank, self.world = tokenize, batch_size, seed, rank, world

    def rows(self, step: int) -> list[int]:
        """This process's rows of the parallel batch of optimizer step `step` (1-based)."""
        per_pass = len(self.source) // self.batch_size
        epoch, index = divmod(step - 1, per_pass)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (epoch + 1))
        order = torch.randperm(len(self.source), generator=generator)
        return order[index * self.batch_size:(index + 1) * self.batch_size][self.rank::self.world].tolist()

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        """{source,target}_{input_ids,attention_mask,...} for step `step`."""
        rows = self.rows(step)
        out: dict[str, torch.Tensor] = {}
        for side, texts in (("source", self.source), ("target", self.target)):
            out.update({f"{side}_{k}": v for k, v in self.tokenize([texts[i] for i in rows]).items()})
        return out
