"""Checkpoints as data: trained tensors in safetensors, everything else in JSON, hashes over all of it.

Two kinds of folder:
- a model (`DualEncoder.save_pretrained`): `model.safetensors` with only the trained or added tensors and
  `lilt_config.json` naming the backbones (and their hashes), the plan, the growth history and the heads.
  The weights' safetensors metadata records a hash of the config's behaviour-defining fields, so an
  edited config (pooling, prefix, dims, plan) is refused instead of silently computing something else.
  A `README.md` model card (lilt.hub) is written beside them; loading never reads it.
- a resumable training state (`output/checkpoints/step-N`): the model files plus optimizer, scheduler,
  EMA, per-process RNG states and the data position, with `manifest.json` listing every file's sha256,
  written last. A folder whose manifest is missing or does not match is skipped (with a warning) in
  favour of the newest complete one.

Loading never runs code from a file: no pickle is ever read, and backbones load with
`trust_remote_code=False` and only safetensors weights. Every folder is assembled under a temporary
name and renamed into place, so a crash at any instant leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import recover_dir, sha256_file, swap_dir, write_json
from .config import ModelConfig
from .errors import BackboneMismatchError, CheckpointError, ConfigError, NonFiniteError
from .growth.grower import replay_growth
from .growth.ops import GrowthOp
from .hub import build_card, write_card
from .plan import apply_plan, budget
from .recipe import TuningPlan
from .towers.text import text_weights_sha256
from .towers.vision import vision_weights_sha256

logger = logging.getLogger(__name__)

CONFIG_NAME = "lilt_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "lilt-dual-encoder"
FORMAT_VERSION = 1
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- model folders ----------------------------------------------------------------------------------
def behaviour(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a loaded model's outputs: model config (not where its backbones live), plan, growth, text
    conventions. The backbones' identity is checked by their own weights' hashes, so they may move."""
    out = json.loads(json.dumps({k: manifest.get(k) for k in ("model", "plan", "growth", "text_conventions")}))
    for tower in ("vision", "text"):
        if isinstance(out["model"], dict) and isinstance(out["model"].get(tower), dict):
            out["model"][tower].pop("name", None)
    return out


def config_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the behaviour-defining part of a manifest (stored with the weights, checked on load)."""
    text = json.dumps(behaviour(manifest), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(saved: Any, now: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{path}.{k}" if path else str(k))]
    if saved != now:
        return [f"{path} (now {json.dumps(now)[:60]}, saved with the weights {json.dumps(saved)[:60]})"]
    return []


def finite_or_raise(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to write tensors holding NaN or infinity (a checkpoint must never carry a diverged run)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"refusing to save {what}: {len(bad)} tensor(s) hold NaN or infinity (first: "
                             f"{bad[0]}). The run diverged; lower TrainConfig.lr or resume from an earlier checkpoint.")


def write_model_files(model: Any, folder: Path) -> dict[str, Any]:
    """Write model.safetensors and lilt_config.json into an empty `folder`; returns the manifest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.delta_state_dict().items()}
    finite_or_raise(tensors, "the model")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lilt_version": __version__,
        "model": model.config.to_dict(),
        "plan": model.plan_state.plan.to_dict() if model.plan_state else None,
        "growth": model.growth,
        "backbones": {name: {"name": tower.source, "sha256": tower.backbone_sha256,
                             "weights_sha256": tower.weights_sha256}
                      for name, tower in (("vision", model.vision), ("text", model.text))},
        "text_conventions": {"pooling": model.text.pooling, "prefix": model.text.prefix,
                             "max_length": model.text.max_length},
    }
    if getattr(model, "ssl_head", None) is not None:  # SLIP's head: only its sizes, so a load can rebuild it
        manifest["ssl_head"] = model.ssl_head_sizes()
    weights = folder / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={
        "format": "pt", "lilt_format": str(FORMAT_VERSION), "lilt_config_sha256": config_digest(manifest),
        "lilt_config": json.dumps(behaviour(manifest), sort_keys=True, ensure_ascii=True)})
    manifest["weights"] = {"file": WEIGHTS_NAME, "sha256": sha256_file(weights), "tensors": len(tensors),
                           "bytes": weights.stat().st_size}
    write_json(folder / CONFIG_NAME, manifest, indent=2)
    return manifest


def write_model(model: Any, path: str | Path, training: Mapping[str, Any] | None = None) -> Path:
    """Save a model folder with its model card: built under a temporary name, then swapped in (the old one survives
    any failure). `training` (lilt.hub.training_summary) adds the data and final validation metrics to the card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = write_model_files(model, tmp)
        if path.is_dir():  # keep what else the folder holds (a README, an eval report), never our own files
            for item in path.iterdir():
                if item.name not in (CONFIG_NAME, WEIGHTS_NAME) and not item.name.startswith("."):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        elif path.exists():
            raise CheckpointError(f"{path} exists and is not a folder; save_pretrained needs a folder path.")
        # After the copy: lilt's earlier card is replaced, a README a person wrote is kept (write_card decides).
        write_card(tmp, build_card(manifest, budget=budget(model), training=training))
        swap_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _require(condition: bool, file: Path, what: str) -> None:
    if not condition:
        raise CheckpointError(f"{file} is damaged: {what}. Save the checkpoint again, or point at another one.")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a model folder's lilt_config.json (structure, format, hashes' shape)."""
    path = Path(path)
    recover_dir(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {str(path)!r}; is it a lilt checkpoint folder (written by "
                              "DualEncoder.save_pretrained or lilt train's output_dir/model)?")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is damaged.") from None
    _require(isinstance(manifest, dict), file, "the top level is not a mapping")
    _require(type(manifest.get("format_version")) is int, file,
             f"format_version {manifest.get('format_version')!r} is not a whole number")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int) \
            or manifest["format_version"] > FORMAT_VERSION or manifest["format_version"] < 1:
        raise CheckpointError(f"{file} is format {manifest.get('format')!r} v{manifest.get('format_version')}; this "
                              f"lilt ({__version__}) reads {FORMAT!r} v1 to v{FORMAT_VERSION}.")
    _require(isinstance(manifest.get("model"), dict), file, "'model' is missing or not a mapping")
    _require("plan" in manifest and (manifest["plan"] is None or isinstance(manifest["plan"], dict)), file,
             "'plan' is missing or not a mapping (null for no plan)")
    growth = manifest.setdefault("growth", [])
    _require(isinstance(growth, list) and all(isinstance(r, dict) and isinstance(r.get("op"), str) for r in growth),
             file, "'growth' is not a list of {op: ...} records")
    backbones = manifest.get("backbones")
    _require(isinstance(backbones, dict) and all(
        isinstance(backbones.get(t), dict) and isinstance(backbones[t].get("name"), str)
        and _HEX64.match(str(backbones[t].get("sha256", ""))) for t in ("vision", "text")),
        file, "'backbones' must name the vision and text backbones with their sha256")
    ssl = manifest.get("ssl_head")
    _require(ssl is None or (isinstance(ssl, list) and len(ssl) == 3 and all(
        type(n) is int and 1 <= n <= 65536 for n in ssl)), file, "'ssl_head' must be [in, hidden, out] sizes")
    weights = manifest.get("weights")
    _require(isinstance(weights, dict) and weights.get("file") == WEIGHTS_NAME
             and _HEX64.match(str(weights.get("sha256", ""))), file,
             f"'weights' must be {{file: {WEIGHTS_NAME}, sha256: ...}}")
    return manifest


def check_weights(path: Path, manifest: Mapping[str, Any]) -> Path:
    """The weights file, after checking its sha256 and that the config it was saved with is this one."""
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete.")
    if sha256_file(file) != manifest["weights"]["sha256"]:
        raise CheckpointError(f"{file} does not match the sha256 recorded in {CONFIG_NAME} (a save was interrupted, "
                              "or the file was changed). Save the checkpoint again.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}).") from None
    recorded = metadata.get("lilt_config_sha256")
    if recorded is not None and recorded != config_digest(manifest):
        try:
            changed = _differences(json.loads(metadata["lilt_config"]), behaviour(manifest))
        except (KeyError, ValueError):
            changed = []
        raise CheckpointError(f"{path / CONFIG_NAME} was edited after the weights were saved: "
                              f"{'; '.join(changed[:3]) or 'its model, plan or growth differ'}. Restore it, or save "
                              "the model again.")
    return file


def _mismatch(name: str, source: str, actual: str, expected: str, manifest: Mapping[str, Any],
              path: Path) -> BackboneMismatchError:
    return BackboneMismatchError(
        f"the {name} backbone {source!r} has weights sha256 {actual[:16]}..., but {path} was trained on "
        f"{manifest['backbones'][name]['name']!r} with sha256 {expected[:16]}.... Point at the right backbone, or "
        "pass check_backbones=False to load anyway.")


def load_model(cls: Any, path: str | Path, *, vision: str | None = None, text: str | None = None,
               check_backbones: bool = True) -> Any:
    """Rebuild a saved model: check every hash, then build backbones, re-apply plan and growth, load tensors."""
    path = Path(path)
    manifest = read_manifest(path)
    model_dict = json.loads(json.dumps(manifest["model"]))
    for name, moved in (("vision", vision), ("text", text)):
        if moved is not None:
            model_dict.setdefault(name, {})["name"] = moved
    try:
        config = ModelConfig.from_dict(model_dict, where=f"{path / CONFIG_NAME}:model")
        plan = TuningPlan.from_dict(manifest["plan"], where=f"{path / CONFIG_NAME}:plan") if manifest["plan"] else None
        for record in manifest["growth"]:  # bounded sizes: nothing huge gets built
            GrowthOp.parse(record["op"])
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    weights = check_weights(path, manifest)  # every hash before any backbone is touched
    # The weights files of a backbone folder are checked before the backbone is built from that folder.
    for name, digest in (("vision", vision_weights_sha256(config.vision)), ("text", text_weights_sha256(config.text))):
        expected = manifest["backbones"][name].get("weights_sha256")
        if check_backbones and digest and expected and digest != expected:
            raise _mismatch(name, getattr(config, name).name, digest, expected, manifest, path)
    model = cls(config)
    for name in ("vision", "text"):
        tower, expected = getattr(model, name), manifest["backbones"][name]["sha256"]
        if check_backbones and tower.backbone_sha256 != expected:
            raise _mismatch(name, tower.source, tower.backbone_sha256, expected, manifest, path)
    conventions = manifest.get("text_conventions") or {}
    for key in ("pooling", "prefix", "max_length"):  # what the model was trained with, whatever the folder's name
        if key in conventions:
            setattr(model.text, key, conventions[key])
    try:
        if plan is not None:
            apply_plan(model, plan)
        if manifest["growth"]:  # rebuild the grown architecture; the saved tensors then fill it
            replay_growth(model, manifest["growth"])
        if manifest.get("ssl_head"):
            model.add_ssl_head(manifest["ssl_head"])
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: its plan or growth history does not apply ({err}).") from None
    load_delta(model, weights)
    return model


def load_delta(model: Any, file: Path) -> None:
    """Load a trainable-only safetensors file into `model`, refusing missing or unexpected tensors."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}).") from None
    expected = model.delta_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit this model: missing {_first(missing)}, unexpected "
                              f"{_first(unexpected)}. Was it saved with another plan or backbone?")
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:  # lilt never saves such a tensor: the file was made elsewhere, or edited
        raise CheckpointError(f"{file} holds NaN or infinity in {_first(broken)}; a model is never saved like that. "
                              "Use an earlier checkpoint.")
    wrong = [k for k, t in tensors.items() if t.shape != expected[k].shape or t.dtype != expected[k].dtype]
    if wrong:
        raise CheckpointError(f"{file} does not fit this model: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)} "
                              f"({tensors[wrong[0]].dtype}), the model {tuple(expected[wrong[0]].shape)} "
                              f"({expected[wrong[0]].dtype}).")
    model.load_state_dict(tensors, strict=False)


def _first(names: list[str], n: int = 8) -> str:
    return str(names[:n])[:-1] + (", ...]" if len(names) > n else "]")


# -- resumable training state -----------------------------------------------------------------------
def checkpoint_dirs(root: str | Path) -> list[Path]:
    """step-N folders under root/checkpoints that claim to be complete (have a manifest), oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST_NAME).is_file()]
    return [p for _, p in sorted(found)]


def verify_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a resumable checkpoint, after checking every file against its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{folder}: {MANIFEST_NAME} is missing or unreadable (an interrupted save).") from None
    for name in (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME, "optimizer.safetensors", "optimizer.json", "scheduler.json"):
        if name not in files:
            raise CheckpointError(f"{folder}: {MANIFEST_NAME} does not list {name}.")
    for name, digest in files.items():
        file = folder / str(name)
        if Path(str(name)).name != name or not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(f"{folder}: {name} is missing or does not match its sha256 in {MANIFEST_NAME} (the "
                                  "file was changed after the checkpoint was written).")
    state = json.loads((folder / STATE_NAME).read_text())
    match = _STEP_DIR.match(folder.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            (match and int(match.group(1)) != state["step"]):
        raise CheckpointError(f"{folder}: {STATE_NAME} does not hold this folder's step.")
    return state


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest step-N folder whose files all match their manifest; damaged ones are skipped with a warning."""
    folder = Path(root) / "checkpoints"
    candidates = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))),
                        reverse=True) if folder.is_dir() else []
    problems = []
    for _, path in candidates:
        try:
            verify_state(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:  # said only when there is something to fall back to (else the error says it)
            logger.warning("skipping a damaged or incomplete checkpoint: %s", problem)
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint under {folder} ({len(problems)} damaged or incomplete; newest: "
                              f"{problems[0]}). Delete them, or set train.resume=never to start afresh.")
    return None


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
    finite_or_raise(tensors, "the optimizer state")
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Inverse of save_optimizer."""
    try:
        layout = json.loads((folder / "optimizer.json").read_text())
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        for key, value in layout["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: the optimizer state does not fit this run ({type(err).__name__}: {err}); "
                              "was it written with another plan or model?") from None


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
    write_json(folder / f"rng_{rank}.json", meta)


def load_rng(folder: Path, rank: int) -> None:
    """Restore this process's RNG state (a checkpoint from fewer processes: fall back to process 0's)."""
    rank = rank if (folder / f"rng_{rank}.json").exists() else 0
    try:
        set_rng_state(load_file(str(folder / f"rng_{rank}.safetensors")),
                      json.loads((folder / f"rng_{rank}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: the random state of process {rank} is unreadable ({err}).") from None


def finalize(tmp: Path, final: Path, state: dict[str, Any], keep: int) -> None:
    """Write the trainer state and the manifest (last), move the folder into place, drop the oldest beyond `keep`."""
    write_json(tmp / STATE_NAME, state)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
    write_json(tmp / MANIFEST_NAME, {"step": state["step"], "files": files})
    swap_dir(tmp, final)
    for old in checkpoint_dirs(final.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


SNAPSHOTS = {"ema": "the moving average", "reference": "the start of tuning (WiSE-FT)", "best": "the best weights"}


def save_training_state(loop: Any, output: Path, step: int, steps_per_epoch: int | None) -> Path:
    """A resumable checkpoint at output/checkpoints/step-N: tensors, optimizer, schedule, EMA, RNG, position."""
    acc = loop.acc
    folder = output / "checkpoints"
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_model_files(loop.model, tmp)
        save_optimizer(loop.optimizer, tmp)
        write_json(tmp / "scheduler.json", loop.scheduler.state_dict())
        for name, what in SNAPSHOTS.items():  # the moving average, WiSE-FT's start, keep_best's best
            tensors = getattr(loop, name, None)
            if tensors is not None:
                tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
                finite_or_raise(tensors, what)
                save_file(tensors, str(tmp / f"{name}.safetensors"))
    acc.wait_for_everyone()
    save_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "steps_per_epoch": steps_per_epoch, "epoch": loop.epoch, "epoch_begin": loop.epoch_begin,
                 "processes": acc.num_processes, "bad_items": loop.bad.state_dict(),
                 "nonfinite": loop.nonfinite, "nonfinite_in_a_row": loop.nonfinite_in_a_row,
                 "best_score": loop.best_score if getattr(loop, "best", None) is not None else None,
                 "best_step": getattr(loop, "best_step", 0)}
        finalize(tmp, final, state, loop.config.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def restore_training_state(loop: Any, folder: Path) -> int:
    """Load a checkpoint written by save_training_state into the loop; returns the step to continue from."""
    meta = verify_state(folder)
    manifest = read_manifest(folder)
    load_delta(loop.model, check_weights(folder, manifest))
    load_optimizer(loop.optimizer, folder)
    try:
        loop.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        loop.bad.load_state_dict(meta["bad_items"])
        loop.nonfinite, loop.nonfinite_in_a_row = int(meta["nonfinite"]), int(meta["nonfinite_in_a_row"])
        loop.epoch, loop.epoch_begin = int(meta["epoch"]), int(meta["epoch_begin"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{folder}: {STATE_NAME} or scheduler.json does not fit this run ({err}).") from None
    load_rng(folder, loop.acc.process_index)
    if loop.ema is not None and (folder / "ema.safetensors").is_file():
        loop.ema = {n: t.to(loop.acc.device) for n, t in load_file(str(folder / "ema.safetensors")).items()}
    for name in ("reference", "best"):  # kept on the CPU, as trainable_state makes them
        if (folder / f"{name}.safetensors").is_file():
            setattr(loop, name, load_file(str(folder / f"{name}.safetensors")))
    if meta.get("best_score") is not None:
        loop.best_score, loop.best_step = float(meta["best_score"]), int(meta.get("best_step", 0))
    return meta["step"]
