"""The errors lilt raises on purpose, under one root, and the 'did you mean' hints they carry.

Anything a user can get wrong (a recipe, data, a checkpoint, a backbone) raises a `LiltError`
subclass whose message names the bad value, where it came from and what would be accepted; the CLI
prints it as one line and exits with status 2. Any other exception is a bug in lilt.
Torch-free, so configs and recipes can be checked without importing torch.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LiltError(Exception):
    """Root of every error lilt raises about its input (printed as one line by the CLI)."""


class ConfigError(LiltError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(LiltError, ValueError):
    """Pair data that cannot be read as asked (missing column, unknown split, too many unreadable items)."""


class CheckpointError(LiltError, ValueError):
    """A checkpoint folder is incomplete, damaged, edited, or holds something lilt never loads (code, pickles)."""


class BackboneMismatchError(CheckpointError):
    """A checkpoint is loaded onto backbone weights other than the ones it was trained on."""


class HubError(LiltError, RuntimeError):
    """The Hugging Face Hub cannot be reached, or refuses an upload (offline, not logged in, no access)."""


class NonFiniteError(LiltError, FloatingPointError):
    """Training produced non-finite values (loss, weights or BatchNorm statistics) and could not go on."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to n candidates that look like `word` (for 'did you mean' hints)."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean ...?' sentence, or '' when nothing is close."""
    hits = close_matches(word, candidates)
    return f" Did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""
