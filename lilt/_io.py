"""Files written so that a crash at any instant leaves the old version or the new one, never half of either.

Every write in lilt goes through here: `atomic_path` (write to a temporary name in the same folder,
fsync, rename over the target), `write_text`/`write_json` on top of it, `swap_dir` (replace a whole
folder), plus `sha256_file` and `lilt_home`. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def lilt_home() -> Path:
    """Where lilt keeps converted backbones and built data: $LILT_HOME, else ~/.cache/lilt."""
    return Path(os.environ.get("LILT_HOME") or Path.home() / ".cache" / "lilt").expanduser()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk, so a rename that follows never exposes an empty file after a crash."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its folder's entry is; not every platform can open a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | Path) -> Path:
    """A unique hidden name next to `path` (same folder, so the final rename stays on one file system)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name rather than mkstemp, whose 0600 mode would carry over; plain open honours the umask.
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically (non-finite floats are refused: JSON has no NaN)."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False, default=float)
                      + "\n")


def swap_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a finished folder `tmp` to `final`; an existing `final` is replaced only once `tmp` is in place.

    rename() cannot replace a non-empty folder, so the old one is first moved aside under a hidden name:
    at every instant either the old or the new folder is complete, and `recover_dir` puts the old one back
    if a crash leaves only the aside copy.
    """
    tmp, final = Path(tmp), Path(final)
    _fsync_dir(tmp)
    if final.exists():
        aside = final.parent / f".{final.name}.old"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def recover_dir(final: str | Path) -> None:
    """Undo a `swap_dir` cut off between its two renames: bring the aside copy back when `final` is missing."""
    final = Path(final)
    aside = final.parent / f".{final.name}.old"
    if not final.exists() and aside.is_dir():
        os.replace(aside, final)
