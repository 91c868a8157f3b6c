"""Closed-form baselines: what frozen towers give without any gradient step.

`RidgeMap` fits a linear map from the image tower's pooled features to the text tower's (ridge
regression, solved in closed form) on training pairs. Retrieval then compares mapped images with
captions by cosine, both centred on the captions' mean: text features share a large common direction
that would otherwise dominate every cosine (on the demo data centring lifts English R@1 from 21 to 23).
It is the bar a trained model has to clear: it uses the same frozen features and the same pairs, and
costs one feature pass plus a linear solve. `heads_from_ridge` turns it into the projection heads'
starting point, so tuning starts at the bar instead of below it.

`KernelRidgeMap` is its nonlinear twin (an RBF kernel on the same standardized features, solved over the
distinct training images): on unseen emoji it reads the frozen features better than any linear map
(benchmarks/claims.py's `kridge-*` rows), and `fit_ridge(kernel="rbf")` chooses its alpha and width on
validation. It scores like the linear map but has no weight matrix, so it cannot initialise the heads.

`TwoWayMap` (`fit_ridge(kernel="rbf-two-way")`) adds the reverse direction: kernel ridge from captions into the
standardized image features, as Shigeto et al. (2015, "Ridge regression, hubness, and zero-shot learning")
propose. Regressing into the text space shrinks mapped images toward the targets' mean, so a few captions
become nearest neighbours of many images (hubs); mapping captions into the image space does not. Retrieval
mixes the two directions' cosines, the weight chosen on validation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence, Union

import datasets
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .eval.hubness import HubnessBank
from .eval.retrieval import EmbeddedPairs, embed_pairs, retrieval_by_lang


class _TextSpaceMap:
    """What retrieval needs of a map from image features into the text space: unit vectors centred on y_mean."""

    y_mean: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Unit vectors of mapped images, centred on the targets' mean (for cosine retrieval)."""
        return F.normalize(self(x) - self.y_mean, dim=-1)

    def embed_texts(self, y: torch.Tensor) -> torch.Tensor:
        """Unit vectors of (normalized) target features, centred like `embed_images`."""
        return F.normalize(F.normalize(y.float(), dim=-1) - self.y_mean, dim=-1)


@dataclass
class RidgeMap(_TextSpaceMap):
    """y ~ y_mean + (x - x_mean) / x_scale @ weight: a ridge-regression map from one feature space to another."""

    weight: torch.Tensor
    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: torch.Tensor
    alpha: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> "RidgeMap":
        """Solve min ||Xs W - (Y - mean Y)||^2 + alpha ||W||^2 on standardized inputs (float64, closed form).

        The intercept (the targets' mean) is not penalized, as in scikit-learn's Ridge.
        """
        x, y = x.double(), y.double()
        mean, scale, y_mean = x.mean(0), x.std(0).clamp_min(1e-6), y.mean(0)
        xs = (x - mean) / scale
        gram = xs.t() @ xs + alpha * torch.eye(xs.shape[1], dtype=xs.dtype)
        weight = torch.linalg.solve(gram, xs.t() @ (y - y_mean))
        return cls(weight.float(), mean.float(), scale.float(), y_mean.float(), alpha)

    @classmethod
    def from_moments(cls, m: "RidgeMoments", alpha: float = 1.0) -> "RidgeMap":
        """The same solve as `fit`, from summed statistics (so folds of a large table never sit in memory)."""
        mean, y_mean = m.sx / m.n, m.sy / m.n
        var = (torch.diagonal(m.sxx) - m.n * mean ** 2) / max(m.n - 1, 1)
        scale = var.clamp_min(0).sqrt().clamp_min(1e-6)
        gram = (m.sxx - m.n * torch.outer(mean, mean)) / torch.outer(scale, scale)
        cross = (m.sxy - m.n * torch.outer(mean, y_mean)) / scale[:, None]
        weight = torch.linalg.solve(gram + alpha * torch.eye(len(gram), dtype=gram.dtype), cross)
        return cls(weight.float(), mean.float(), scale.float(), y_mean.float(), alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map features x into the target space."""
        return self.y_mean + ((x.float() - self.x_mean) / self.x_scale) @ self.weight


KERNEL_MAX_IMAGES = 8192  # the solve is n x n in the distinct training images (float64: 0.5 GiB at this size)


@dataclass
class KernelRidgeMap(_TextSpaceMap):
    """y ~ y_mean + k(xs, support) @ coef, k(a, b) = exp(-gamma ||a - b||^2 / width) on standardized inputs."""

    support: torch.Tensor  # the distinct training inputs, standardized (float64)
    coef: torch.Tensor
    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: torch.Tensor
    alpha: float
    gamma: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, gamma: float = 1.0,
            counts: torch.Tensor | None = None) -> "KernelRidgeMap":
        """Kernel ridge regression of y on distinct inputs x, each standing for `counts[i]` pairs (default 1).

        `y[i]` is the mean target of x[i]'s pairs. Solving (K + alpha C^-1) A = Y - y_mean over the distinct
        inputs gives exactly the fit on the pairs themselves (one row per pair) at a fraction of the size.
        Standardization and the intercept are weighted by the counts, as they would be over the pairs.
        """
        return cls.fit_grid(x, y, [(alpha, gamma)], counts)[0]

    @classmethod
    def fit_grid(cls, x: torch.Tensor, y: torch.Tensor, grid: Sequence[tuple[float, float]],
                 counts: torch.Tensor | None = None) -> list["KernelRidgeMap"]:
        """`fit` at each (alpha, gamma) of `grid`, sharing the standardization and the pairwise distances."""
        x, y = x.double(), y.double()
        c = torch.ones(len(x), dtype=torch.float64) if counts is None else counts.double().cpu()
        if len(c) != len(x) or len(x) == 0 or bool((c <= 0).any()):
            raise ConfigError(f"KernelRidgeMap.fit needs one positive count per input; got {len(c)} counts for "
                              f"{len(x)} inputs (min {float(c.min()) if len(c) else 'none'}).")
        n = float(c.sum())
        mean = c @ x / n
        scale = ((c @ (x - mean) ** 2) / max(n - 1, 1)).sqrt().clamp_min(1e-6)
        y_mean = c @ y / n
        support = (x - mean) / scale
        distances = _squared_distances(support, support)
        return [cls(support, torch.linalg.solve(_rbf_of(distances, gamma, support.shape[1]) + torch.diag(alpha / c),
                                                y - y_mean), mean, scale, y_mean.float(), alpha, gamma)
                for alpha, gamma in grid]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map features x into the target space (in chunks: the kernel rows are n_train wide)."""
        out = [_rbf((part.double().cpu() - self.x_mean) / self.x_scale, self.support, self.gamma) @ self.coef
               for part in x.split(4096)]
        return self.y_mean + (torch.cat(out) if out else x.new_zeros(0, len(self.y_mean)).double()).float()


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for every pair of rows."""
    return torch.cdist(a, b).pow(2)


def _rbf_of(distances: torch.Tensor, gamma: float, width: int) -> torch.Tensor:
    """exp(-gamma d / width) of squared distances d: the width division keeps one gamma grid for any feature count."""
    return torch.exp(distances * (-gamma / width))


def _rbf(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    """The RBF kernel between the rows of a and of b."""
    return _rbf_of(_squared_distances(a, b), gamma, a.shape[1])


@dataclass
class TwoWayMap:
    """Kernel ridge both ways: images into the text space (`forward`), captions into the standardized image
    features (`reverse`); scores (1 - weight) cos(forward) + weight cos(reverse), as one dot product of the
    concatenated, weighted unit vectors (so translation maps, CSLS and the ensemble take it like any map)."""

    forward: KernelRidgeMap
    reverse: KernelRidgeMap  # unit caption features -> image features standardized as the forward map's inputs
    weight: float

    @property
    def alpha(self) -> float:
        """The forward map's ridge penalty."""
        return self.forward.alpha

    @property
    def gamma(self) -> float:
        """The forward map's kernel width."""
        return self.forward.gamma

    def _mix(self, forward: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        return torch.cat([(1 - self.weight) ** 0.5 * forward, self.weight ** 0.5 * reverse], dim=-1)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Unit vectors: the mapped image and its own standardized features, weighted."""
        standardized = (x.double().cpu() - self.forward.x_mean) / self.forward.x_scale
        return self._mix(self.forward.embed_images(x), F.normalize(standardized.float(), dim=-1))

    def embed_texts(self, y: torch.Tensor) -> torch.Tensor:
        """Unit vectors: the caption's (centred) features and the caption mapped into the image features, weighted."""
        mapped = self.reverse(F.normalize(y.float(), dim=-1).cpu())
        return self._mix(self.forward.embed_texts(y), F.normalize(mapped, dim=-1))


TextSpaceMap = Union[RidgeMap, KernelRidgeMap, TwoWayMap]
KERNELS = ("linear", "rbf", "rbf-two-way")
REVERSE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
LINEAR_ALPHAS = (1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0, 1e4)
RBF_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # 3.0: seed 2 of the demo chose 1.0, the first grid's edge
RBF_GAMMAS = (0.5, 1.0, 2.0, 4.0)


@dataclass
class RidgeMoments:
    """Count and sums of (x, y) pairs (float64): what a ridge fit needs; they add and subtract across folds."""

    n: float
    sx: torch.Tensor
    sxx: torch.Tensor
    sy: torch.Tensor
    sxy: torch.Tensor

    @classmethod
    def zeros(cls, x_width: int, y_width: int) -> "RidgeMoments":
        """No pairs yet."""
        z = torch.zeros
        return cls(0.0, z(x_width, dtype=torch.float64), z(x_width, x_width, dtype=torch.float64),
                   z(y_width, dtype=torch.float64), z(x_width, y_width, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> None:
        """Add distinct inputs x, each paired `counts[i]` times, whose targets sum to y[i] (rows of x)."""
        x, y, c = x.double(), y.double(), counts.double()
        self.n += float(c.sum())
        self.sx += c @ x
        self.sxx += (x.t() * c) @ x
        self.sy += y.sum(0)
        self.sxy += x.t() @ y

    def __sub__(self, other: "RidgeMoments") -> "RidgeMoments":
        return RidgeMoments(self.n - other.n, self.sx - other.sx, self.sxx - other.sxx, self.sy - other.sy,
                            self.sxy - other.sxy)

    def __add__(self, other: "RidgeMoments") -> "RidgeMoments":
        return RidgeMoments(self.n + other.n, self.sx + other.sx, self.sxx + other.sxx, self.sy + other.sy,
                            self.sxy + other.sxy)


def pair_features(model: Any, data: datasets.Dataset, *, stages: bool = False, **options: Any) -> EmbeddedPairs:
    """The frozen towers' pooled features (no heads) of each distinct image and every caption.

    `stages`: the images' multi-scale features instead (pooled, then each vision block's pooled output:
    DualEncoder.image_stage_features); the pooled ones are their first `model.vision.hidden_size` columns.
    """
    return embed_pairs(model, data, features="stages" if stages else True, **options)


def pooled_part(features: EmbeddedPairs, model: Any) -> EmbeddedPairs:
    """The pooled features inside multi-scale ones (`pair_features(stages=True)`): the first hidden_size columns."""
    return replace(features, images=features.images[:, :model.vision.hidden_size])


def fit_ridge(train: EmbeddedPairs, alphas: Sequence[float] | None = None, val: EmbeddedPairs | None = None,
              kernel: str = "linear", gammas: Sequence[float] = RBF_GAMMAS) -> TextSpaceMap:
    """Fit image features -> text features on training pairs; choose alpha (and gamma) by validation mean recall.

    `kernel`: 'linear' (RidgeMap), 'rbf' (KernelRidgeMap, over the distinct training images) or 'rbf-two-way'
    (TwoWayMap: that map and its reverse, captions -> image features; the reverse map's alpha and width, then
    the mixing weight, chosen on validation). Without `val` the middle of each grid is used.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"ridge kernel={kernel!r} is not one of {list(KERNELS)}.")
    y = F.normalize(train.texts, dim=-1)
    if kernel == "linear":
        grid = [(a, None) for a in (alphas or LINEAR_ALPHAS)]
    else:
        grid = [(a, g) for a in (alphas or RBF_ALPHAS) for g in gammas]
    if val is None:
        grid = [grid[len(grid) // 2]]
    if kernel == "linear":
        x = train.images[train.text_image]  # one row per caption: an image is a sample for each of its captions
        maps: list[TextSpaceMap] = [RidgeMap.fit(x, y, a) for a, _ in grid]
    else:
        counts = torch.bincount(train.text_image, minlength=len(train.images))
        used = counts > 0  # images without a caption carry no target
        if int(used.sum()) > KERNEL_MAX_IMAGES:
            raise ConfigError(f"ridge kernel 'rbf' solves over the distinct training images: {int(used.sum())} > "
                              f"{KERNEL_MAX_IMAGES}; use the 'linear' kernel or fewer training images.")
        sums = torch.zeros(len(train.images), y.shape[1], dtype=torch.float64).index_add_(
            0, train.text_image, y.double())
        maps = KernelRidgeMap.fit_grid(train.images[used], sums[used] / counts[used, None], grid, counts[used])
    forward = _best(maps, val)
    if kernel != "rbf-two-way":
        return forward
    assert isinstance(forward, KernelRidgeMap)
    if len(train.texts) > KERNEL_MAX_IMAGES:
        raise ConfigError(f"ridge kernel 'rbf-two-way' solves its reverse map over the training captions: "
                          f"{len(train.texts)} > {KERNEL_MAX_IMAGES}; use the 'rbf' kernel or fewer training pairs.")
    # The reverse targets: each caption's image, standardized as the forward map standardizes its inputs.
    targets = ((train.images.double() - forward.x_mean) / forward.x_scale)[train.text_image]
    reverses = KernelRidgeMap.fit_grid(y.float(), targets, grid)
    reverse = _best([TwoWayMap(forward, r, 1.0) for r in reverses], val).reverse
    weights = REVERSE_WEIGHTS if val is not None else (REVERSE_WEIGHTS[len(REVERSE_WEIGHTS) // 2],)
    return _best([TwoWayMap(forward, reverse, w) for w in weights], val)


def map_choices(ridge: TextSpaceMap) -> dict[str, float]:
    """What validation chose for a map (ridge_alpha, and ridge_gamma / ridge_reverse_* where it has them)."""
    out = {"ridge_alpha": ridge.alpha}
    if isinstance(ridge, (KernelRidgeMap, TwoWayMap)):
        out["ridge_gamma"] = ridge.gamma
    if isinstance(ridge, TwoWayMap):
        out.update(ridge_reverse_alpha=ridge.reverse.alpha, ridge_reverse_gamma=ridge.reverse.gamma,
                   ridge_reverse_weight=ridge.weight)
    return out


def _best(maps: Sequence[Any], val: EmbeddedPairs | None) -> Any:
    """The map with the highest validation mean recall (the last on a tie; the only one without a choice)."""
    if len(maps) == 1 or val is None:
        return maps[0]
    scored = [(ridge_retrieval(m, val)["all"]["mean_recall"], i) for i, m in enumerate(maps)]
    return maps[max(scored)[1]]


def ridge_pairs(ridge: TextSpaceMap, features: EmbeddedPairs) -> EmbeddedPairs:
    """Frozen-feature pairs mapped into the shared space by `ridge` (what its retrieval scores)."""
    return EmbeddedPairs(ridge.embed_images(features.images), ridge.embed_texts(features.texts),
                         features.text_image, features.langs, features.skipped)


def ridge_retrieval(ridge: TextSpaceMap, features: EmbeddedPairs, k: Sequence[int] = (1, 5, 10),
                    hubness: HubnessBank | None = None) -> dict[str, Any]:
    """Retrieval recall@K per language when images are mapped into the text space by `ridge`.

    `hubness`: a HubnessBank of `ridge_pairs` of the training features, for the CSLS-corrected scores.
    """
    mapped = ridge_pairs(ridge, features)
    return retrieval_by_lang(hubness.correct(mapped) if hubness is not None else mapped, k)


def heads_from_ridge(model: Any, ridge: RidgeMap, text_features: torch.Tensor) -> None:
    """Set `model.vision_proj` and `model.text_proj` so the model's cosine scores approximate `ridge`'s retrieval.

    Tuning then starts from the closed-form baseline rather than below it: fresh (or briefly warmed-up)
    heads on the same frozen features retrieve worse than the ridge map, and the first steps would only
    climb back to it. `text_features` are the training captions' pooled features (what the text head sees).

    The ridge scores compare normalize(ridge(x) - y_mean) with normalize(normalize(y) - y_mean) in the text
    width D; the heads project onto P, the top embed_dim principal directions of the centred unit text
    features (all of them when embed_dim == D, where the scores are the ridge's exactly for texts of
    constant norm): text_proj(y) = (y / mean_norm - y_mean) @ P and vision_proj(x) = ridge(x) - y_mean
    projected on P. The heads see raw features, so the text normalization is folded in as a division by
    the training texts' mean norm (nearly constant for e5-style towers).
    """
    if not isinstance(ridge, RidgeMap):
        raise ConfigError(f"heads_from_ridge needs a linear RidgeMap; got a {type(ridge).__name__}, which has no "
                          "weight matrix to put in the heads: fit it with fit_ridge(kernel='linear').")
    vision, text = model.vision_proj, model.text_proj
    if vision.bias is None or text.bias is None:
        raise ConfigError("heads_from_ridge needs projection heads with a bias (ModelConfig.head_bias: true): "
                          "the ridge map centres both images and texts.")
    (in_width, width), embed_dim = tuple(ridge.weight.shape), text.out_features
    if (in_width, width) != (vision.in_features, text.in_features):
        raise ConfigError(f"the ridge map takes {in_width}-wide image features to {width}-wide text features, but "
                          f"the model's heads take {vision.in_features} and {text.in_features}; fit it on this "
                          f"model's features (pair_features).")
    if text_features.dim() != 2 or text_features.shape[1] != width or len(text_features) == 0:
        raise ConfigError(f"heads_from_ridge needs the training captions' features as a (n, {width}) tensor with "
                          f"n >= 1; got shape {tuple(text_features.shape)}.")
    if embed_dim > width:
        raise ConfigError(f"heads_from_ridge: embed_dim={embed_dim} exceeds the text features' width {width}, "
                          f"beyond which the ridge scores have no directions; use embed_dim <= {width}.")
    y = text_features.detach().double().cpu()  # the solve runs on the CPU, like RidgeMap.fit
    norms = y.norm(dim=-1)
    y_mean = ridge.y_mean.double().cpu()
    centred = y / norms.clamp_min(1e-12)[:, None] - y_mean
    # Right singular vectors of `centred` from the eigenvectors of its D x D Gram matrix (float64): small
    # whatever the number of captions, and a full basis even when there are fewer captions than D.
    _, vectors = torch.linalg.eigh(centred.t() @ centred)
    basis = vectors.flip(-1)[:, :embed_dim]  # eigh sorts ascending
    mapped = ridge.weight.double().cpu() @ basis  # (in_width, embed_dim)
    scale, x_mean = ridge.x_scale.double().cpu(), ridge.x_mean.double().cpu()
    with torch.no_grad():
        for head, weight, bias in (
                (text, basis.t() / norms.mean(), -(y_mean @ basis)),
                (vision, (mapped / scale[:, None]).t(), -((x_mean / scale) @ mapped))):
            head.weight.copy_(weight.to(head.weight.dtype))
            head.bias.copy_(bias.to(head.bias.dtype))
