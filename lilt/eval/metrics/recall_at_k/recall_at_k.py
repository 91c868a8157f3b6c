"""Recall@K for retrieval from per-query similarity rows, as a Hugging Face `evaluate` metric loaded by path."""

# One import per line, and only numpy/datasets/evaluate: evaluate copies this file alone into its modules
# cache and scans its `import` lines (it misreads `import a, b`) to check the dependencies are installed.
from math import comb

import datasets
import evaluate
import numpy as np

TIE_TOL = 1e-5  # as lilt.eval.retrieval: scores this close count as tied

_DESCRIPTION = """\
Recall@K (in %) of a retrieval run: the share of queries whose correct candidate ranks in the top K.

Each query comes as a row of similarity scores over its candidates (higher = more similar). A query may
have several correct candidates (an image with captions in several languages, or from several annotators
as in COCO): it counts as a hit when ANY of them ranks in the top K, i.e. its best-scoring positive is
used. Wrong candidates that tie with that positive (scores within 1e-5) share the places they span with
it, as if ties were broken at random: collapsed embeddings (all scores equal) score chance, neither 0
nor 100. This is the rule of `lilt.eval.retrieval.recall_at_k`, which computes the
same numbers from embeddings a block of queries at a time; this metric takes the full score rows and is
meant for score matrices that fit in memory and for cross-checking.

Scores are stored as float32 (the precision of the embeddings they come from): float64 scores closer
than float32 resolution become ties.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per query, the similarity of the query to every
        candidate (rows may differ in length when queries have different candidate sets).
    references (`int` or `list` of `int`): per query, the index of its correct candidate in its row, or the
        list of indices when it has several. Every query needs at least one.
    k (`int` or `list` of `int`, defaults to `(1, 5, 10)`): the cut-offs K.
    direction (`str`, optional): a prefix for the keys, e.g. `"i2t"` gives `"i2t/R@1"`; none gives `"R@1"`.
Returns:
    `dict`: `"<direction>/R@<K>"` -> recall@K in % (0 to 100) for each K.
Examples:
    >>> recall = evaluate.load("path/to/recall_at_k")
    >>> recall.compute(predictions=[[0.9, 0.1, 0.3], [0.2, 0.5, 0.8]], references=[0, 1], k=[1, 2])
    {'R@1': 50.0, 'R@2': 100.0}
    >>> recall.compute(predictions=[[0.2, 0.9, 0.5]], references=[[0, 2]], k=[1, 2], direction="i2t")
    {'i2t/R@1': 0.0, 'i2t/R@2': 100.0}
"""

_CITATION = ""

_SCORES = datasets.Sequence(datasets.Value("float32"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Recall@K over similarity rows; several positives per query; ties share the places they span."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric; references are one index or a list of indices per query."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first option an example fits: several positives, else a single index.
            features=[
                datasets.Features({"predictions": _SCORES, "references": datasets.Sequence(datasets.Value("int64"))}),
                datasets.Features({"predictions": _SCORES, "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, k=(1, 5, 10), direction=None) -> dict:
        """Recall@K in % for each K."""
        ks = (k,) if isinstance(k, int) else tuple(k)
        counts = np.array([positive_rank(np.asarray(row, dtype=np.float32), ref, query)
                           for query, (row, ref) in enumerate(zip(predictions, references))], dtype=np.int64)
        prefix = f"{direction}/" if direction else ""
        return {f"{prefix}R@{kk}": 100.0 * float(np.mean(hit_chance(counts, kk))) for kk in ks}


def hit_chance(counts: np.ndarray, k: int) -> np.ndarray:
    """Chance that one of counts[:, 2] tied positives is in the top k, behind counts[:, 0] wrong candidates
    and among counts[:, 1] tied wrong ones (ties broken at random: a miss is C(tied, r) / C(tied + own, r))."""
    out = np.empty(len(counts))
    for i, (higher, tied, own) in enumerate(counts):
        places = k - higher
        out[i] = 0.0 if places <= 0 else 1.0 if places > tied else 1.0 - comb(tied, places) / comb(tied + own, places)
    return out


def positive_rank(scores: np.ndarray, positives, query: int) -> tuple:
    """Wrong candidates above the query's best positive, wrong ones tied with it, and its positives tied with it."""
    positives = np.atleast_1d(np.asarray(positives, dtype=np.int64))
    if positives.size == 0:
        raise ValueError(f"query {query} has no correct candidate in references; recall is undefined for it")
    if positives.min() < 0 or positives.max() >= len(scores):
        raise ValueError(f"query {query}: reference indices {positives.tolist()} are outside its "
                         f"{len(scores)} candidates (expected 0 to {len(scores) - 1})")
    wrong = np.ones(len(scores), dtype=bool)
    wrong[positives] = False
    best = scores[positives].max()
    tie = np.abs(scores - best) <= TIE_TOL
    return int((scores[wrong] > best + TIE_TOL).sum()), int(tie[wrong].sum()), int(tie[~wrong].sum())
