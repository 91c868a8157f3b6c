"""Exact resume: mid-epoch, dropout on, 1 and 2 processes, after checkpoints and after random SIGKILLs.

The fast tests stop a run at a mid-epoch checkpoint and resume it (in-process), and check that a resumed
epoch gives each of 2 processes the batches of the epoch it resumes. The slow ones SIGKILL a `lilt train`
20 times at random instants, some of them while a checkpoint is being written, resume it each time with
`resume: auto`, and compare its final weights with an uninterrupted run's: they must be bit-equal.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lilt
from lilt.config import DataConfig, TrainConfig
from lilt.training import epoch_batches, train

REPO = Path(__file__).resolve().parents[2]
LWA = REPO / "recipes" / "methods" / "lwa.yaml"
PAIRS, BATCH = 48, 8  # 6 steps per epoch


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- fast: stop at a mid-epoch checkpoint, resume ---------------------------------------------------------

def _train(make_model, out: Path, steps: int, **options) -> lilt.DualEncoder:
    model = make_model("vit")  # BERT's default dropout (0.1) stays on
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    lilt.apply_plan(model, LWA)
    config = TrainConfig(output_dir=str(out), steps=steps, batch_size=BATCH, report_to=[], warmup_steps=2, lr=1e-3,
                         log_every=1, **options)
    data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 24})  # 3 steps per epoch
    return train(model, data, config).model


def test_a_mid_epoch_resume_with_dropout_ends_bit_equal(make_model, tmp_path: Path) -> None:
    straight = _train(make_model, tmp_path / "straight", 10, save_every=4, keep_checkpoints=5)
    reference = straight.delta_state_dict()
    for step in (4, 8):  # epoch 1 batch 1, epoch 2 batch 2
        out = tmp_path / f"from-{step}"
        shutil.copytree(tmp_path / "straight" / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
        resumed = _train(make_model, out, 10, save_every=4).delta_state_dict()
        print(f"resumed from step {step}: max abs weight difference {max_difference(reference, resumed):.3g}")
        assert bit_equal(reference, resumed)


def test_a_resumed_epoch_gives_each_process_the_batches_it_would_have() -> None:
    from accelerate.data_loader import prepare_data_loader

    from lilt.data import pair_loader

    table = datasets.Dataset.from_dict({"row": list(range(PAIRS))})

    def loader(rank: int):
        plain = pair_loader(table, lambda items: [i["__row__"] for i in items], BATCH, seed=3)
        return prepare_data_loader(plain, num_processes=2, process_index=rank, split_batches=True,
                                   put_on_device=False)

    for rank in (0, 1):
        straight = [list(epoch_batches(loader(rank), epoch)) for epoch in range(3)]
        assert straight[1] != straight[2]  # a fresh order each epoch
        before = torch.random.get_rng_state()
        resumed = list(epoch_batches(loader(rank), 2, skip=4))  # a fresh loader: as after a restart
        assert resumed == straight[2][4:]
        # Iterating draws the worker seed from the loader's own generator, not from the training RNG.
        assert torch.equal(before, torch.random.get_rng_state())


# -- slow: random SIGKILLs ----------------------------------------------------------------------------------

@pytest.fixture()
def recipe(tiny_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """The tiny ViT + BERT recipe of test_train.py, dropout on (BERT's default 0.1)."""
    data = {
        "model": {"vision": {"name": str(tiny_dirs["vit"]), "image_size": 32},
                  "text": {"name": str(tiny_dirs["bert"])}, "embed_dim": 16},
        "plan": yaml.safe_load(LWA.read_text())["plan"],
        "train": {"batch_size": BATCH, "log_every": 10, "report_to": [], "warmup_steps": 2, "lr": 1e-3},
        "data": {"source": "builtin:tiny-random", "num_workers": 0, "options": {"n": PAIRS}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(recipe: Path, out: Path, overrides: tuple[str, ...], processes: int) -> list[str]:
    args = ["-m", "lilt.cli", "-v", "train", "--recipe", str(recipe), "--output-dir", str(out), *overrides]
    if processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(_free_port()), *args]


def _start(recipe: Path, out: Path, overrides: tuple[str, ...], processes: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(_command(recipe, out, overrides, processes), stdout=handle, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (torch's launcher starts each worker in a session of its own)."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return [pid] + [d for c in children for d in _tree(c)]


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the run and every process under it, as a node failure would."""
    for _ in range(3):  # again, in case a process was being spawned
        for pid in _tree(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait()
    for pid in _tree(process.pid)[1:]:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)


def _complete(out: Path) -> list[int]:
    from lilt.checkpoint import checkpoint_dirs
    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(out)]


def _writing(out: Path, after: int) -> bool:
    try:
        names = os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return False
    return any(n.startswith(".tmp-step-") and int(n.rsplit("-", 1)[1]) > after for n in names)


def _wait(process: subprocess.Popen, until, timeout: float = 240.0, poll: float = 0.0005) -> bool:
    """Poll until `until()`; False when the run ended first."""
    deadline = time.time() + timeout
    while not until():
        if process.poll() is not None:
            return False
        assert time.time() < deadline, "the run made no progress"
        time.sleep(poll)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_twenty_random_sigkills_end_bit_equal(recipe: Path, tmp_path: Path, processes: int) -> None:
    steps, kills = 300, 20
    overrides = (f"train.steps={steps}", "train.save_every=4")  # 4 of 6 steps per epoch: most saves mid-epoch
    began = time.time()
    log = tmp_path / "straight.log"
    straight = _start(recipe, tmp_path / "straight", overrides, processes, log)
    assert straight.wait(timeout=600) == 0, log.read_text()[-3000:]
    reference = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    print(f"uninterrupted run: {time.time() - began:.0f}s")

    out, rng, resumed_at, expected, during_write = tmp_path / "killed", random.Random(processes), [], [], 0
    for kill in range(kills + 1):
        log = tmp_path / f"run-{kill}.log"
        process = _start(recipe, out, overrides, processes, log)
        if kill == kills:
            assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
        else:
            base = max(_complete(out), default=0)
            # Wait for one checkpoint after the resumed one (so that every restart makes progress), then kill
            # either at once when the next checkpoint write begins, or after a random delay.
            alive = _wait(process, lambda: max(_complete(out), default=0) > base)
            base = max(_complete(out), default=0)
            if alive and kill % 2 == 0:
                alive = _wait(process, lambda: _writing(out, base))
            elif alive:
                time.sleep(rng.uniform(0.0, 1.0))
            assert alive and process.poll() is None, "the run ended before it was killed: raise train.steps"
            _kill(process)
            during_write += _writing(out, max(_complete(out), default=0))
            expected.append(max(_complete(out)))  # the newest complete checkpoint, which the next run must use
        if kill:
            found = re.search(r"resumed from \S+ \(step (\d+)\)", log.read_text())
            resumed_at.append(int(found.group(1)) if found else None)
    final = load_file(str(out / "model" / "model.safetensors"))
    difference = max_difference(reference, final)
    print(f"{processes} process(es), {kills} SIGKILLs ({during_write} during a checkpoint write), resumed at "
          f"{resumed_at}: max abs weight difference {difference:.3g}, {time.time() - began:.0f}s in all")
    assert resumed_at == expected, "a run did not resume from the newest complete checkpoint"
    assert any(s % 6 for s in resumed_at), "no resume landed mid-epoch"
    assert during_write >= 1, "no kill landed during a checkpoint write"
    assert bit_equal(reference, final)
