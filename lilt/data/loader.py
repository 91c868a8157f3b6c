"""Torch views of a pair table: row access by (epoch, row) keys, a per-epoch seeded shuffle, loaders."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


class PairTable(Dataset):
    """A map-style `datasets.Dataset` read a batch at a time; each item carries its row and epoch."""

    def __init__(self, data: datasets.Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        # One Arrow read per batch instead of one per row.
        rows = [row for _, row in keys]
        columns = self.data[rows]
        return [{**{name: values[i] for name, values in columns.items()}, "__epoch__": epoch, "__row__": row}
                for i, (epoch, row) in enumerate(keys)]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]


class StreamedPairs(IterableDataset):
    """A streamed source (webdataset shards, hub streaming) with a running row number per epoch."""

    def __init__(self, data: datasets.IterableDataset, shuffle_buffer: int = 1000, seed: int = 0) -> None:
        self.data, self.buffer, self.seed, self.epoch = data, shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the stream differently each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.data.shuffle(seed=self.seed, buffer_size=self.buffer) if self.buffer else self.data
        stream.set_epoch(self.epoch)
        for row, item in enumerate(stream):
            yield {**item, "__epoch__": self.epoch, "__row__": row}


class EpochSampler(Sampler):
    """Yields (epoch, row) keys: a fresh seeded permutation each epoch, rows in order, or weighted draws."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, weights: torch.Tensor | None = None) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.weights = weights  # per-row sampling weights: an epoch draws `size` rows with replacement

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation (the same for a given seed and epoch on every process)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            return iter([(self.epoch, i) for i in range(self.size)])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            rows = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
            return iter([(self.epoch, int(i)) for i in rows])
        return iter([(self.epoch, int(i)) for i in torch.randperm(self.size, generator=generator)])


def language_weights(langs: Sequence[str], alpha: float) -> torch.Tensor:
    """Per-row weights drawing language l with probability proportional to n_l ** alpha (XLM-R's sampling)."""
    _, index, counts = np.unique(np.asarray(list(langs)), return_inverse=True, return_counts=True)
    per_row = counts.astype(np.float64) ** (alpha - 1.0)  # n_l rows share n_l ** alpha
    return torch.from_numpy(per_row[index])


def pair_loader(data: datasets.Dataset | datasets.IterableDataset, collate: Callable, batch_size: int, *,
                shuffle: bool = True, drop_last: bool = True, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False, weights: torch.Tensor | None = None) -> DataLoader:
    """A DataLoader over pairs whose collate function decodes, augments and tokenizes."""
    # Each iteration draws the workers' base seed from `generator`: a loader-owned one keeps that draw out of
    # the global RNG (dropout), which a resumed epoch would otherwise advance once more than the run it resumes.
    options = {"num_workers": num_workers, "pin_memory": pin_memory and torch.cuda.is_available(),
               "persistent_workers": False, "collate_fn": collate, "batch_size": batch_size,
               "drop_last": drop_last, "generator": torch.Generator().manual_seed(seed)}
    if isinstance(data, datasets.IterableDataset):
        return DataLoader(StreamedPairs(data, seed=seed) if shuffle else StreamedPairs(data, 0, seed), **options)
    return DataLoader(PairTable(data), sampler=EpochSampler(len(data), seed, shuffle, weights), **options)
