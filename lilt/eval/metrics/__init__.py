"""Hugging Face `evaluate` metrics shipped inside lilt, loaded by path so they work with no hub.

Each metric is a folder `<name>/<name>.py` next to this file (the layout `evaluate.load` accepts for a local
path); the scripts import only numpy, datasets and evaluate, since evaluate copies them alone into its modules
cache. `lilt.eval.retrieval.recall_at_k` stays the path for large evaluations (it never builds the full score
matrix); `retrieval_with_evaluate` gives the same numbers through the `recall_at_k` metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def shipped_metrics() -> list[str]:
    """Names of the metrics shipped with lilt (folders holding a script of the same name)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **options: Any) -> "evaluate.EvaluationModule":
    """`evaluate.load` of a metric shipped with lilt, by path (no hub); options go to `evaluate.load`."""
    # Imported here: evaluate pulls in transformers' pipelines, seconds that `import lilt` should not pay.
    import evaluate

    shipped = shipped_metrics()
    if name not in shipped:
        raise ValueError(f"unknown lilt metric {name!r}; the metrics shipped in {METRICS_DIR} are: "
                         f"{', '.join(shipped)}")
    return evaluate.load(str(METRICS_DIR / name), **options)


def retrieval_with_evaluate(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor,
                            k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall_at_k`'s numbers (same keys) through the `recall_at_k` evaluate metric, from full score rows."""
    metric = load_metric("recall_at_k", keep_in_memory=True)  # in memory: no cache files or locks to clean up
    text_image = text_image.long()
    # image -> text: each image's row over all captions; its positives are all its captions. Images without a
    # caption have no positive and are left out, as recall_at_k does.
    i2t_scores = (images @ texts.t()).float().numpy()
    captions = [[] for _ in range(len(images))]
    for text, image in enumerate(text_image.tolist()):
        captions[image].append(text)
    has_caption = [i for i, c in enumerate(captions) if c]
    out = metric.compute(predictions=i2t_scores[has_caption], references=[captions[i] for i in has_caption],
                         k=list(k), direction="i2t")
    # text -> image: each caption's row over all images; its positive is its own image.
    t2i_scores = (texts @ images.t()).float().numpy()
    out.update(metric.compute(predictions=t2i_scores, references=text_image.tolist(), k=list(k), direction="t2i"))
    ordered = {f"{d}/R@{kk}": out[f"{d}/R@{kk}"] for kk in k for d in ("i2t", "t2i")}
    ordered["mean_recall"] = float(np.mean(list(ordered.values())))
    return ordered
