"""Zero-shot classification: class names in any language, turned into text embeddings by prompt templates.

Each class is embedded once per template ("a photo of a {}.") and the normalized embeddings are averaged
and renormalized (CLIP's prompt ensembling); an image is assigned the class whose embedding is closest.
Images are embedded once and scored against every language's class embeddings, so languages compare on
exactly the same images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets
import torch
import torch.nn.functional as F

from ..configbase import read_mapping
from ..cpu_memory import keeps_freed_memory
from ..errors import ConfigError, DataError
from ..data.loader import pair_loader
from ..data.transforms import PairCollator
from ..finite import check_finite
from .retrieval import TIE_TOL, hit_chance

logger = logging.getLogger(__name__)

TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")
TemplateSource = str | Path | Mapping[str, Sequence[str]] | None


def load_templates(source: TemplateSource = None) -> dict[str, list[str]]:
    """Templates per language from the shipped file (None), a YAML/JSON file, or a mapping; validated."""
    where = str(source) if isinstance(source, (str, Path)) else "the templates mapping"
    if source is None:
        source, where = TEMPLATES_FILE, f"{TEMPLATES_FILE.name} (shipped with lilt)"
    if isinstance(source, (str, Path)):
        source = read_mapping(source)  # yaml.safe_load / json.loads only; ConfigError on a bad or missing file
    if not isinstance(source, Mapping) or not source:
        raise ConfigError(f"{where}: expected a non-empty mapping of language -> list of templates, "
                          f"got {type(source).__name__}.")
    out: dict[str, list[str]] = {}
    for lang, templates in source.items():
        if not isinstance(lang, str):
            # YAML 1.1 reads an unquoted `no` (Norwegian) or `on` as a boolean.
            raise ConfigError(f"{where}: language key {lang!r} is not a string; quote it in YAML (e.g. \"no\":).")
        if isinstance(templates, str) or not isinstance(templates, Iterable):
            raise ConfigError(f"{where}: templates for {lang!r} must be a list of strings such as "
                              f"[\"a photo of a {{}}.\", \"{{}}\"], got {templates!r}.")
        templates = list(templates)
        if not templates:
            raise ConfigError(f"{where}: language {lang!r} has no templates; give at least [\"{{}}\"] or remove it.")
        for template in templates:
            _check_template(template, lang, where)
        out[lang] = templates
    return out


def _check_template(template: Any, lang: str, where: str) -> None:
    if not isinstance(template, str):
        raise ConfigError(f"{where}: template {template!r} for {lang!r} is not a string.")
    holes = template.count("{}")
    # Other braces would break str.format (and hint at a named field such as {name}).
    stray = template.replace("{}", "").count("{") + template.replace("{}", "").count("}")
    if holes != 1 or stray:
        raise ConfigError(f"{where}: template {template!r} for language {lang!r} must contain exactly one '{{}}' "
                          f"where the class name goes and no other braces (found {holes} '{{}}'"
                          f"{f' and {stray} stray braces' if stray else ''}); write it like "
                          f"'a photo of a {{}}.'.")


def _eval_mode(model: Any) -> bool:
    """Put the model in eval mode and say whether it was training (to restore it afterwards)."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    return was_training


def _restore(model: Any, was_training: bool) -> None:
    if hasattr(model, "train"):
        model.train(was_training)


@keeps_freed_memory
@torch.inference_mode()
def class_embeddings(model: Any, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings [C, D] per class: the renormalized mean of its normalized template embeddings."""
    if not classnames or not templates:
        raise ConfigError(f"class_embeddings needs at least one class and one template; got {len(classnames)} "
                          f"classes and {len(templates)} templates.")
    # Class-major order, so the captions of class i are rows i*T .. i*T+T-1.
    captions = [template.replace("{}", name) for name in classnames for template in templates]
    was_training = _eval_mode(model)
    try:
        chunks = []
        for start in range(0, len(captions), batch_size):
            batch = model.tokenize(captions[start:start + batch_size])
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            chunks.append(model.encode_text(batch).float().cpu())
    finally:
        _restore(model, was_training)
    # Re-normalize each caption first: the average must weigh every template equally.
    per_caption = F.normalize(torch.cat(chunks), dim=-1)
    mean = per_caption.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(mean, dim=-1)


@keeps_freed_memory
@torch.inference_mode()
def embed_images(model: Any, data: datasets.Dataset, image_column: str = "image", batch_size: int = 256,
                 num_workers: int = 0) -> torch.Tensor:
    """Unit image embeddings [N, D] of every row, in row order; an unreadable image is a DataError."""
    if image_column not in data.column_names:
        raise DataError(f"no image column {image_column!r} in the data (columns: {data.column_names}); "
                        f"pass image_column=...")
    collate = PairCollator(model.image_transform(train=False), tokenize=None, image_column=image_column,
                           extra_columns=())
    # Only the image column travels through the loader: labels and captions are not needed per batch.
    loader = pair_loader(data.select_columns([image_column]), collate, batch_size, shuffle=False,
                         drop_last=False, num_workers=num_workers)
    was_training = _eval_mode(model)
    chunks, bad = [], []
    try:
        for batch in loader:
            bad += batch["bad"]
            if "pixel_values" in batch and not bad:  # once one fails we only collect the other failures
                chunks.append(model.encode_image(batch["pixel_values"].to(model.device)).float().cpu())
    finally:
        _restore(model, was_training)
    if bad:
        # Skipping would shift every later image against its label, so refuse instead.
        raise DataError(f"{len(bad)} of {len(data)} images could not be read: {'; '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}. Remove those rows (e.g. data.filter or data.select) "
                        f"before evaluating, so images and labels stay aligned.")
    if not chunks:
        raise DataError("no images to embed: the data has no rows.")
    return F.normalize(torch.cat(chunks), dim=-1)


def _resolve_classnames(classnames: Sequence[str] | Mapping[str, Sequence[str]],
                        templates: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Class names per language; a plain list is English, or the only language the templates have."""
    if isinstance(classnames, str):
        raise ConfigError(f"classnames must be a list of names or a dict lang -> list, not the string "
                          f"{classnames!r}.")
    if not isinstance(classnames, Mapping):
        lang = next(iter(templates)) if len(templates) == 1 else "en"
        classnames = {lang: classnames}
    names = {lang: list(values) for lang, values in classnames.items()}
    if not names:
        raise ConfigError("classnames is an empty mapping; give lang -> list of class names.")
    sizes = {lang: len(values) for lang, values in names.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ConfigError(f"every language needs the same non-empty list of classes in the same order (class i "
                          f"is the same class in every language); got these lengths: {sizes}.")
    return names


def _resolve_templates(templates: TemplateSource | Sequence[str]) -> tuple[dict[str, list[str]], list[str] | None]:
    """(templates per language, templates shared by every language when a plain list was given)."""
    if isinstance(templates, Sequence) and not isinstance(templates, str):
        return {}, load_templates({"every language": templates})["every language"]  # validated the same way
    return load_templates(templates), None


def _labels(data: datasets.Dataset, label_column: str, n_classes: int) -> torch.Tensor:
    if label_column not in data.column_names:
        raise DataError(f"no label column {label_column!r} in the data (columns: {data.column_names}); "
                        f"pass label_column=... or add integer labels 0..C-1 (data.add_column).")
    labels = torch.as_tensor(data[label_column])
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise DataError(f"label column {label_column!r} must hold one integer class index per row, "
                        f"got dtype {labels.dtype}, shape {tuple(labels.shape)}.")
    bad = ((labels < 0) | (labels >= n_classes)).nonzero().flatten()
    if len(bad):
        rows = bad[:5].tolist()
        raise DataError(f"label column {label_column!r} has {len(bad)} labels outside 0..{n_classes - 1} (there "
                        f"are {n_classes} class names), e.g. {labels[rows].tolist()} at rows {rows}; "
                        f"give a class name for every label or drop those rows.")
    return labels


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int, tol: float = TIE_TOL) -> torch.Tensor:
    """Per row, the chance (0..1) that the true class is in the top K when ties are broken at random."""
    check_finite(scores, "zero-shot scores")  # NaN would count as a hit: never score from it
    positive = scores.gather(1, labels[:, None])
    higher = (scores > positive + tol).sum(1)
    tied = ((scores - positive).abs() <= tol).sum(1) - 1
    # Ties split the places they span evenly (the rule of retrieval recall too): a model whose class
    # embeddings all collapse to one vector scores chance (K/C), not 100% (ties won) nor 0% (ties lost).
    return hit_chance(higher, tied, k)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: Sequence[int]) -> dict[str, float]:
    """Top-K accuracy in % for top-1 and each K below the number of classes (K >= C would be trivially 100)."""
    return {f"top{kk}": 100.0 * float(topk_hits(scores, labels, kk).mean()) for kk in k
            if kk == 1 or kk < scores.shape[1]}


def _blockwise_accuracy(images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor, k: Sequence[int],
                        block: int = 4096) -> dict[str, float]:
    """topk_accuracy over images @ texts.T, a block of images at a time (ImageNet: 50k x 1k scores)."""
    ks = [kk for kk in k if kk == 1 or kk < texts.shape[0]]
    hits: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
    for start in range(0, len(images), block):
        scores = images[start:start + block] @ texts.t()
        for kk in ks:
            hits[kk].append(topk_hits(scores, labels[start:start + block], kk))
    return {f"top{kk}": 100.0 * float(torch.cat(hits[kk]).mean()) for kk in ks}


def evaluate_zeroshot(model: Any, data: datasets.Dataset, classnames: Sequence[str] | Mapping[str, Sequence[str]],
                      templates: TemplateSource | Sequence[str] = None, *, label_column: str = "label",
                      image_column: str = "image", k: Sequence[int] = (1, 5), batch_size: int = 256,
                      num_workers: int = 0) -> dict[str, dict[str, float]]:
    """Zero-shot top-K accuracy (%) per language of class names, plus their mean; images are embedded once."""
    templates_by_lang, shared = _resolve_templates(templates)
    names = _resolve_classnames(classnames, templates_by_lang)
    n_classes = len(next(iter(names.values())))
    labels = _labels(data, label_column, n_classes)
    images = embed_images(model, data, image_column, batch_size, num_workers)
    results: dict[str, dict[str, float]] = {}
    for lang, lang_names in names.items():
        lang_templates = shared or templates_by_lang.get(lang)
        if lang_templates is None:
            logger.warning("no zero-shot templates for language %r (templates exist for %s); using the bare "
                           "class names ['{}']", lang, ", ".join(sorted(templates_by_lang)))
            lang_templates = ["{}"]
        texts = class_embeddings(model, lang_names, lang_templates, batch_size)
        results[lang] = {**_blockwise_accuracy(images, texts, labels, k), "classes": n_classes, "images": len(labels)}
    metric_names = [name for name in next(iter(results.values())) if name.startswith("top")]
    results["mean"] = {name: sum(r[name] for r in results.values()) / len(names) for name in metric_names}
    results["mean"]["languages"] = len(names)
    return results


def emoji_zeroshot(split: str = "test", langs: Sequence[str] = ("en", "sw", "yo", "am", "ha", "mr"),
                   cache_dir: str | Path | None = None) -> tuple[datasets.Dataset, dict[str, list[str]]]:
    """A zero-shot task on builtin:emoji-cldr: one row per emoji (image, label) and its CLDR name per language."""
    from ..data.emoji_cldr import load_emoji_cldr

    langs = list(langs)
    pairs = load_emoji_cldr(split, langs=langs, cache_dir=cache_dir)
    images: dict[str, Any] = {}
    names: dict[str, dict[str, str]] = {}
    for emoji, lang, text, image in zip(pairs["emoji"], pairs["lang"], pairs["text"], pairs["image"]):
        images.setdefault(emoji, image)
        names.setdefault(emoji, {})[lang] = text
    # A class must have a name in every language, or the languages would not score the same task.
    kept = sorted(e for e in names if all(lang in names[e] for lang in langs))
    logger.info("emoji zero-shot (%s split, %s): %d classes; dropped %d emoji without a name in every language",
                split, ",".join(langs), len(kept), len(names) - len(kept))
    if not kept:
        raise DataError(f"no emoji of the {split!r} split has a CLDR name in all of {langs}; use fewer languages.")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                                  "emoji": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [images[e] for e in kept], "label": list(range(len(kept))),
                                       "emoji": kept}, features=features)
    return data, {lang: [names[e][lang] for e in kept] for lang in langs}


__all__ = ["TEMPLATES_FILE", "class_embeddings", "embed_images", "emoji_zeroshot", "evaluate_zeroshot",
           "load_templates", "topk_accuracy", "topk_hits"]
