"""Top-k classification accuracy from per-example class scores, as a Hugging Face `evaluate` metric loaded by path."""

# One import per line, and only numpy/datasets/evaluate: evaluate copies this file alone into its modules
# cache and scans its `import` lines (it misreads `import a, b`) to check the dependencies are installed.
import datasets
import evaluate
import numpy as np

TIE_TOL = 1e-5  # as lilt.eval.retrieval: scores this close count as tied

_DESCRIPTION = """\
Top-k accuracy (in %) of a classifier that scores every class, e.g. zero-shot classification with a
dual encoder (image embedding vs one text embedding per class name) or a linear probe (logits).

An example is correct at k when its true class ranks in the top k of its score row. Wrong classes that
tie with the true class (scores within 1e-5) share the places they span with it, as if ties were broken
at random: a classifier that cannot tell classes apart scores chance (the rule `recall_at_k` and
`lilt.eval.zeroshot` use too). Scores are stored as float32.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per example, a score for every class.
    references (`list` of `int`): the true class of each example, an index into its row.
    k (`int` or `list` of `int`, defaults to `(1, 5)`): the cut-offs k.
Returns:
    `dict`: `"top<k>"` -> top-k accuracy in % (0 to 100) for each k.
Examples:
    >>> accuracy = evaluate.load("path/to/topk_accuracy")
    >>> accuracy.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], references=[1, 2], k=[1, 2])
    {'top1': 50.0, 'top2': 100.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    """Top-k accuracy over class-score rows; tied classes share the places they span."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric: a score row and a label per example."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=(1, 5)) -> dict:
        """Top-k accuracy in % for each k."""
        ks = (k,) if isinstance(k, int) else tuple(k)
        ranks = []
        for example, (row, label) in enumerate(zip(predictions, references)):
            scores = np.asarray(row, dtype=np.float32)
            if not 0 <= label < len(scores):
                raise ValueError(f"example {example}: label {label} is outside its {len(scores)} classes "
                                 f"(expected 0 to {len(scores) - 1})")
            true = scores[label]
            ranks.append((int((scores > true + TIE_TOL).sum()), int((np.abs(scores - true) <= TIE_TOL).sum()) - 1))
        counts = np.asarray(ranks, dtype=np.float64).reshape(-1, 2)
        return {f"top{kk}": 100.0 * float(np.mean(np.clip((kk - counts[:, 0]) / (counts[:, 1] + 1), 0, 1)))
                for kk in ks}
