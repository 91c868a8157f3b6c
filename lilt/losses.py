"""Contrastive losses as pure functions on embeddings, with negatives gathered from every process.

Inputs are L2-normalized embeddings of the local batch. When torch.distributed is initialized with
more than one process, the other processes' embeddings are gathered with a *differentiable*
all-gather (accelerate's `gather` carries no gradient), so every process sees the global batch as
negatives. The returned loss is the global mean when `local_loss=False` (identical on every
process) or this process's share when `local_loss=True` (open_clip's cheaper variant: local rows
against global columns). Either way, averaging gradients across processes (what DDP does) gives
the gradient of the global loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("clip", "siglip")


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not running)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` from all processes (gradient flows back to each source) and this process's row offset.

    Processes may hold different numbers of rows (a batch that lost corrupt images): rows are padded
    to the largest count for the collective and trimmed afterwards.
    """
    if world_size() == 1:
        return x, 0
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = F.pad(x, (0,) * (2 * x.dim() - 1) + (max(counts) - x.shape[0],))
    with warnings.catch_warnings():
        # The replacement it suggests (_functional_collectives) is private; this one is public and works.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        from torch.distributed.nn.functional import all_gather
        parts = all_gather(padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), sum(counts[:rank])


def same_image_mask(row_ids: torch.Tensor | None, column_ids: torch.Tensor | None,
                    offset: int = 0) -> torch.Tensor | None:
    """True where logit (i, j) pairs two different rows of one image (row i is column i + offset); None if none do.

    A table with one row per caption (an English and a Swahili caption of one photo) can put one image in a
    batch twice; without this mask each of those rows would be the other's negative.
    """
    if row_ids is None or column_ids is None:
        return None
    same = row_ids[:, None] == column_ids[None, :].to(row_ids.device)
    rows = torch.arange(len(row_ids), device=same.device)
    same[rows, rows + offset] = False  # a row's own pair is its positive
    return same if bool(same.any()) else None


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, *,
              gather: bool = True, local_loss: bool = False, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): each image's caption among all captions, and each caption's image.

    `image_ids` (one per pair) names each pair's image: two pairs of one image are masked out of each
    other's softmax, neither negative nor extra positive. That is false-negative elimination (Huynh et al.,
    WACV 2022), chosen over multi-positive targets (UniCL) because it keeps one target per row: the loss is
    exactly CLIP's whenever a batch repeats no image (seeded runs do not move), and open_clip, whose loss
    this follows, has no multi-positive variant to match.
    """
    n = image_embeds.shape[0]
    if text_embeds.shape[0] != n:
        raise ValueError(f"clip_loss needs one caption per image; got {n} images and {text_embeds.shape[0]} texts")
    if not gather or world_size() == 1:
        logits = logit_scale * image_embeds @ text_embeds.t()
        labels = torch.arange(n, device=logits.device)
        same = same_image_mask(image_ids, image_ids)
        if same is not None:
            logits = logits.masked_fill(same.to(logits.device), float("-inf"))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    all_images, offset = gather_with_grad(image_embeds)
    all_texts, _ = gather_with_grad(text_embeds)
    # Integer ids take the same padded collective; they carry no gradient.
    all_ids = gather_with_grad(image_ids)[0] if image_ids is not None else None
    if local_loss:
        labels = torch.arange(n, device=image_embeds.device) + offset
        per_image_logits = logit_scale * image_embeds @ all_texts.t()
        per_text_logits = logit_scale * text_embeds @ all_images.t()
        same = same_image_mask(image_ids, all_ids, offset)
        if same is not None:
            same = same.to(per_image_logits.device)
            per_image_logits = per_image_logits.masked_fill(same, float("-inf"))
            per_text_logits = per_text_logits.masked_fill(same, float("-inf"))
        per_image = F.cross_entropy(per_image_logits, labels)
        per_text = F.cross_entropy(per_text_logits, labels)
        # Weight by the local share so that the mean over processes is the global mean.
        return (per_image + per_text) / 2 * (n * world_size() / all_images.shape[0])
    return clip_loss(all_images, all_texts, logit_scale, gather=False, image_ids=all_ids)


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, *, gather: bool = True,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every image-text pair is a binary match/non-match decision.

    As in the paper, the sum over all pairs is divided by the number of images; with several
    processes each one scores its local images against all texts. Pairs sharing an image (`image_ids`)
    are matches: the sigmoid scores each image-caption pair on its own, and that caption does describe it.
    """
    n = image_embeds.shape[0]
    all_texts, offset = gather_with_grad(text_embeds) if gather else (text_embeds, 0)
    logits = logit_scale * image_embeds @ all_texts.t() + logit_bias
    signs = -torch.ones_like(logits)
    signs[torch.arange(n, device=logits.device), torch.arange(n, device=logits.device) + offset] = 1.0
    if image_ids is not None:
        all_ids = gather_with_grad(image_ids)[0] if gather else image_ids
        same = same_image_mask(image_ids, all_ids, offset)
        if same is not None:
            signs = signs.masked_fill(same.to(signs.device), 1.0)
    # Global loss = sum over all pairs / global batch; this process's share, scaled by the process
    # count so that averaging over processes gives it back.
    processes = world_size() if gather else 1
    return -F.logsigmoid(signs * logits).sum() * processes / all_texts.shape[0]


def simclr_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.1, *,
                gather: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR, as SLIP uses it): two views of each image; the other view is the positive."""
    a, b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
    if gather and world_size() > 1:
        a, _ = gather_with_grad(a)
        b, _ = gather_with_grad(b)
    m = a.shape[0]
    views = torch.cat([a, b])
    logits = views @ views.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    targets = torch.cat([torch.arange(m, 2 * m), torch.arange(0, m)]).to(logits.device)
    return F.cross_entropy(logits, targets)
