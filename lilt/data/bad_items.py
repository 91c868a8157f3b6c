"""Unreadable training items: skipped and counted over all processes, and a stop when there are too many.

The fraction is checked per epoch and over a running window of the last `window` items, so a run
shorter than an epoch (or the first epoch of a large set) stops on bad data too, and once more over
the partial epoch when the run ends.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch

from ..errors import DataError

logger = logging.getLogger(__name__)


class BadItems:
    """Counts seen and unreadable items (all processes together) and raises DataError past a fraction."""

    def __init__(self, accelerator: Any, max_fraction: float, window: int) -> None:
        self.acc, self.max_fraction, self.window = accelerator, max_fraction, window
        self.seen = self.bad = self.total = 0
        self.names: list[str] = []
        self.recent: deque[tuple[int, int]] = deque()  # per batch: (seen, bad), the last `window` items
        self.recent_seen = self.recent_bad = 0

    def count(self, batch: dict[str, Any]) -> bool:
        """Add a batch's counts over all processes; False when some process got no usable pair (skip the step)."""
        empty = "pixel_values" not in batch and "image_index" not in batch  # image_index: a lilt.cache batch
        local = torch.tensor([batch["seen"], len(batch["bad"]), int(empty)], device=self.acc.device)
        seen, bad, empty = (int(x) for x in self.acc.reduce(local, "sum"))
        self.seen, self.bad = self.seen + seen, self.bad + bad
        if len(self.names) < 20:
            self.names += batch["bad"][:20 - len(self.names)]
        self.recent.append((seen, bad))
        self.recent_seen, self.recent_bad = self.recent_seen + seen, self.recent_bad + bad
        while self.recent and self.recent_seen - self.recent[0][0] >= self.window:
            old_seen, old_bad = self.recent.popleft()
            self.recent_seen, self.recent_bad = self.recent_seen - old_seen, self.recent_bad - old_bad
        if self.recent_seen >= self.window:
            self._check(self.recent_bad, self.recent_seen, f"the last {self.recent_seen} items")
        return empty == 0

    def end_epoch(self, epoch: int) -> None:
        """Check and report an epoch's unreadable items, then start counting the next epoch."""
        self.finish(f"epoch {epoch}")
        self.seen = self.bad = 0
        self.names = []

    def finish(self, where: str = "the run's last, partial epoch") -> None:
        """Check the items counted since the epoch began (the run also calls this when it ends mid-epoch)."""
        if not self.bad:
            return
        self._check(self.bad, self.seen, where)
        self.total += self.bad
        names = self._first_names()  # a collective: every process takes part
        if self.acc.is_main_process:
            logger.warning("skipped %d of %d unreadable items in %s (%.2f%%), e.g. %s", self.bad, self.seen, where,
                           100 * self.bad / max(1, self.seen), "; ".join(names))
        self.seen = self.bad = 0

    def _check(self, bad: int, seen: int, where: str) -> None:
        fraction = bad / max(1, seen)
        if fraction > self.max_fraction:
            raise DataError(
                f"{bad} of {seen} items ({fraction:.1%}) in {where} could not be read, more than "
                f"DataConfig.max_bad_fraction={self.max_fraction}. First ones: {'; '.join(self._first_names())}. "
                "Fix or remove them, or raise max_bad_fraction.")

    def _first_names(self) -> list[str]:
        if self.acc.num_processes == 1:
            return self.names[:5]
        from accelerate.utils import gather_object
        return [n for names in gather_object([self.names]) for n in names][:5]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run counts on where it left off."""
        return {"seen": self.seen, "bad": self.bad, "total": self.total, "names": self.names,
                "recent": [list(r) for r in self.recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict."""
        self.seen, self.bad, self.total = int(state["seen"]), int(state["bad"]), int(state["total"])
        self.names = list(state["names"])
        self.recent = deque((int(s), int(b)) for s, b in state["recent"])
        self.recent_seen = sum(s for s, _ in self.recent)
        self.recent_bad = sum(b for _, b in self.recent)
