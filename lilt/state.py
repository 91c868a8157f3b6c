"""Resumable training state in safetensors + JSON: trainable tensors, optimizer, scheduler, RNG, position.

Accelerate's `save_state` pickles the optimizer, scheduler and RNG states (`torch.load` on resume,
RNG with `weights_only=False`). lilt never unpickles a file, so it writes the same contents as
safetensors and JSON instead. A checkpoint is assembled in a temporary folder, every process
adding its own RNG file, and renamed into place by the main process: a kill at any instant leaves
the previous complete checkpoint usable. `trainer_state.json` is written last and marks completeness.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state: tensors to optimizer.safetensors, hyper-parameters and layout to optimizer.json."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Inverse of save_optimizer."""
    layout = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in layout["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's python, numpy, torch (and CUDA) random states, as tensors and JSON."""
    np_state = np.random.get_state()
    tensors = {"torch": torch.random.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss], "numpy": [np_state[0], *np_state[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    torch.random.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_rng(folder: Path, rank: int) -> None:
    """Write this process's RNG state into a checkpoint folder."""
    tensors, meta = rng_state()
    save_file(tensors, str(folder / f"rng_{rank}.safetensors"))
    _write_json(folder / f"rng_{rank}.json", meta)


def load_rng(folder: Path, rank: int) -> None:
    """Restore this process's RNG state (a checkpoint from fewer processes: fall back to process 0's)."""
    rank = rank if (folder / f"rng_{rank}.json").exists() else 0
    set_rng_state(load_file(str(folder / f"rng_{rank}.safetensors")),
                  json.loads((folder / f"rng_{rank}.json").read_text()))


def finalize(tmp: Path, final: Path, state: dict[str, Any], keep: int) -> None:
    """Mark a checkpoint complete, move it into place atomically and drop the oldest beyond `keep`."""
    _write_json(tmp / STATE_NAME, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(final.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    """The step, data position and counters of a checkpoint."""
    return json.loads((folder / STATE_NAME).read_text())


def _write_json(file: Path, data: Any) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, file)
