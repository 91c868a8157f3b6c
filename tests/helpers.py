"""Helpers several test modules share: data written to disk, a model whose answers are known, `lilt train` runs.

Fixtures live in conftest.py; plain functions and constants here, so no test module imports another.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"model_kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
LWA = REPO / "recipes" / "methods" / "lwa.yaml"

# Image folders (tests/test_data.py's sources, the training loop's bad data).
DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "crop_pct": 1.0}
FOLDER_CAPTIONS = ["a red square", "a blue circle", "a green tree", "a small dog", "a black cat", "a white boat"]


def write_images(folder: Path, n: int, corrupt: int = 0, size: int = 16) -> list[str]:
    """n PNG files (the first `corrupt` of them truncated garbage); returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i:03d}.png"
        if i < corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        else:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def write_imagefolder(folder: Path, n: int, corrupt: int = 0) -> Path:
    """An imagefolder with metadata.jsonl (file_name, caption, lang)."""
    names = write_images(folder, n, corrupt)
    lines = [json.dumps({"file_name": name, "caption": FOLDER_CAPTIONS[i % len(FOLDER_CAPTIONS)], "lang": "en"})
             for i, name in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# Colour axes of the fake model: a red image is a cat, a green one a dog, a blue one a bird.
ANCHORS = {"cat": 0, "paka": 0, "dog": 1, "mbwa": 1, "bird": 2, "ndege": 2}
COLOURS = {"red": (230, 10, 10), "green": (10, 230, 10), "blue": (10, 10, 230)}
ANIMALS = {"red": "cat", "green": "dog", "blue": "bird"}


class FakeModel(torch.nn.Module):
    """Text: a known word is a fixed axis, any other word a small hashed vector; image: its mean colour."""

    def __init__(self, dim: int = 4, unit_text: bool = True) -> None:
        super().__init__()
        self.unit_text = unit_text  # False: text vectors of varying length, to test the ensembling's normalization
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device, like a DualEncoder
        self.dim = dim
        self.text_calls: list[int] = []
        self.images_seen = 0
        self.training_while_encoding: set[bool] = set()

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        words = [[zlib.crc32(w.strip(".,:").encode()) for w in t.split()] for t in texts]
        width = max(len(w) for w in words)
        return {"ids": torch.tensor([w + [-1] * (width - len(w)) for w in words], dtype=torch.long)}

    def _word(self, word_id: int) -> torch.Tensor:
        for word, axis in ANCHORS.items():
            if zlib.crc32(word.encode()) == word_id:
                return F.one_hot(torch.tensor(axis), self.dim).float()
        return 0.05 * torch.randn(self.dim, generator=torch.Generator().manual_seed(word_id))

    def encode_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.text_calls.append(len(batch["ids"]))
        self.training_while_encoding.add(self.training)
        rows = [sum((self._word(int(i)) for i in ids if i >= 0), torch.zeros(self.dim)) for ids in batch["ids"]]
        rows = torch.stack(rows)
        return F.normalize(rows, dim=-1) if self.unit_text else rows

    def image_transform(self, train: bool = False):
        return lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)).mean((0, 1)) / 255.0

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(pixels)
        self.training_while_encoding.add(self.training)
        return F.normalize(F.pad(pixels, (0, self.dim - pixels.shape[1])), dim=-1)


def searchable_fake_model() -> FakeModel:
    """A FakeModel that `export_embeddings` accepts (it records the backbones' names in the index)."""
    model = FakeModel()
    model.vision = model.text = SimpleNamespace(source="fake-colours")
    return model.eval()


def write_colour_table(folder: Path, captions_per_image: int = 1) -> Path:
    """red.png, green.png, blue.png and pairs.csv captioning them "a cat/dog/bird number I" (FakeModel's axes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,text,lang,key"]
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(folder / f"{name}.png")
        rows += [f"{name}.png,a {ANIMALS[name]} number {i},en,item-{name}" for i in range(captions_per_image)]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def png(rgb: tuple[int, int, int], size: int = 4) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def colour_data(colours: list[tuple[int, int, int]], labels: list[int]) -> datasets.Dataset:
    """Solid-colour PNG rows with integer labels."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": [png(c) for c in colours], "label": labels}, features=features)


def lilt_train(recipe: Path, out: Path, *overrides: str, processes: int = 1) -> subprocess.CompletedProcess:
    """Run `lilt train` in a subprocess, under `accelerate launch` with cpu-2proc.yaml for 2 processes."""
    args = ["-m", "lilt.cli", "train", "--recipe", str(recipe), "--output-dir", str(out), *overrides]
    if processes == 2:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if "loss" in h]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Tiny towers (tests/conftest.py builds them): which directories make up a model under test, and batches.
# Which backbone directories make up the model for each tower under test, and which tower it is.
TOWER_CASES = {"vit": ("vit", "bert", "vision"), "cnn": ("cnn", "bert", "vision"), "bert": ("vit", "bert", "text")}
CAPTIONS = ["a cat on a tree", "the red car", "a small dog with a ball", "a bird in the blue sky"]


def sample_batch(model, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random images at the vision tower's resolution and tokenized captions."""
    size = model.vision.data_config["input_size"][-1]
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, model.tokenize(CAPTIONS[:n])


def embeddings(model, images: torch.Tensor, text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.encode_image(images), model.encode_text(text)
    model.train(was_training)
    return out


def clip_loss(model, images: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric InfoNCE over a batch (enough to drive a training step in tests)."""
    out = model(images, **text)
    logits = out.logits_per_image()
    labels = torch.arange(len(images))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.t(), labels)) / 2
