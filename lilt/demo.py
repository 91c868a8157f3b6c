"""`lilt demo`: the packaged backbones end to end, offline (training joins when `lilt train` lands)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DEFAULT_TEXT, DEFAULT_VISION
from .model import WEIGHTS_NAME, DualEncoder
from .plan import apply_plan, budget
from .towers.packaged import lilt_home

CAPTIONS = {"en": "a cat", "es": "un gato", "de": "eine Katze", "sw": "paka", "fr": "un chat",
            "unrelated 1": "a red car", "unrelated 2": "the stock market fell"}


def _vision_sanity() -> None:
    """ImageNet top-3 of the packaged EfficientNet-Lite0 on public-domain photos from scikit-image."""
    try:
        from skimage import data
    except ImportError:
        print("  (scikit-image is not installed: `pip install scikit-image` to see ImageNet predictions)")
        return
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo

    from .towers.packaged import packaged_path

    classifier = timm.create_model("local-dir:" + str(packaged_path(DEFAULT_VISION)), pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=classifier))
    names = ImageNetInfo()
    for photo in ("chelsea", "coffee", "rocket"):
        image = Image.fromarray(getattr(data, photo)()).convert("RGB")
        with torch.inference_mode():
            probs = classifier(transform(image).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(3)
        guesses = ", ".join(f"{names.index_to_description(int(i))} {float(p):.2f}" for p, i in zip(*top))
        print(f"  {photo:<9} -> {guesses}")


def _text_sanity(model: DualEncoder) -> None:
    """Cosine similarity of the frozen text tower's pooled features to 'a cat'."""
    with torch.inference_mode():
        feats = F.normalize(model.text(model.tokenize(list(CAPTIONS.values()))), dim=-1)
    sims = feats @ feats[0]
    for (lang, text), sim in zip(list(CAPTIONS.items())[1:], sims[1:]):
        print(f"  {text!r:<26} ({lang:<11}) {float(sim):.3f}")


def _budget_table(model: DualEncoder, recipe_dir: Path) -> None:
    recipes = sorted(recipe_dir.glob("*.yaml"))
    print(f"  {'recipe':<12}{'trainable':>12}{'total':>14}{'%':>8}{'vision %':>10}{'text %':>9}")
    for recipe in recipes:
        candidate = copy.deepcopy(model)  # cheaper than reloading the backbones for every recipe
        apply_plan(candidate, recipe)
        row = budget(candidate)
        print(f"  {recipe.stem:<12}{row.trainable:>12,}{row.total:>14,}{row.percent:>8.2f}"
              f"{row.by_tower['vision']['percent']:>10.2f}{row.by_tower['text']['percent']:>9.2f}")
        del candidate


def run_demo(out_dir: Path, recipe_dir: str | Path = "recipes/methods") -> int:
    """Load the packaged pair, show that both backbones work, print budgets, save and reload lwa."""
    start = time.perf_counter()
    print(f"lilt demo: {DEFAULT_VISION} + {DEFAULT_TEXT}, no network needed")
    print(f"(the first run converts the packaged weights into {lilt_home()}/packaged, about 15 s)\n")
    model = DualEncoder.from_backbones(DEFAULT_VISION, DEFAULT_TEXT).eval()
    print(f"loaded both backbones in {time.perf_counter() - start:.1f} s "
          f"(vision: {model.vision.num_blocks} stages, {model.vision.hidden_size}-d; text: {model.text.num_blocks} "
          f"layers, {model.text.hidden_size}-d, {model.text.pooling} pooling, prefix {model.text.prefix!r})\n")
    print("1. the frozen vision backbone recognises photos (ImageNet top-3):")
    _vision_sanity()
    print("\n2. the frozen multilingual text backbone: cosine similarity to 'a cat':")
    _text_sanity(model)
    recipe_dir = Path(recipe_dir)
    if recipe_dir.is_dir():
        print(f"\n3. trainable parameters per recipe ({recipe_dir}):")
        _budget_table(model, recipe_dir)
    lwa = recipe_dir / "lwa.yaml"
    if lwa.is_file():
        apply_plan(model, lwa)
        print(f"\n4. the lwa plan in detail:\n{budget(model)}")
        checkpoint = model.save_pretrained(out_dir / "checkpoint")
        reloaded = DualEncoder.from_pretrained(checkpoint).eval()
        images, texts = torch.randn(2, 3, 224, 224), ["a cat", "un gato"]
        with torch.inference_mode():
            diff = max(float((model.encode_image(images) - reloaded.encode_image(images)).abs().max()),
                       float((model.encode_text(texts) - reloaded.encode_text(texts)).abs().max()))
        size = os.path.getsize(checkpoint / WEIGHTS_NAME)
        full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        print(f"\ncheckpoint: {checkpoint}/ ({size / 1e6:.2f} MB of trained tensors, {100 * size / full:.2f}% of the "
              f"full {full / 1e6:.0f} MB state dict); reloaded, max embedding difference {diff:.1e}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s. Training (`lilt train`) is not in this version yet.")
    return 0
