"""GradCache: the exact gradient of a whole batch's contrastive loss, with the activations of one micro-batch.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from accelerate import Accelerator


def grad_cache_backward(prepared: torch.nn.Module, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                        chunks: int, loss_fn: Callable, accelerator: Accelerator,
                        image_ids: torch.Tensor | None = None) -> float:
    """Backward of the whole batch's contrastive loss, holding activations of one micro-batch at a time.

    GradCache (Gao et al. 2021): embed every micro-batch without a graph, take the loss and its
    gradient w.r.t. the embeddings over the full batch (all negatives), then re-run each micro-batch
    with a graph and backpropagate those cached gradients. Each re-run replays the RNG state of its
    first pass, so dropout masks match and the gradient equals the full-batch one.
    """
    micro = split_inputs(inputs, chunks)
    states, images, texts = [], [], []
    with torch.no_grad():
        for part in micro:
            states.append(rng_snapshot())
            out = prepared(**part)
            images.append(out.image_embeds)
            texts.append(out.text_embeds)
    after = rng_snapshot()
    image = torch.cat(images).detach().requires_grad_()
    text = torch.cat(texts).detach().requires_grad_()
    scale = model.scale().detach().requires_grad_()
    bias = model.logit_bias.detach().requires_grad_() if model.logit_bias is not None else None
    loss = loss_fn(image, text, scale, bias, **({"image_ids": image_ids} if image_ids is not None else {}))
    wrt = [image, text, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    g_image, g_text = grads[0].split([len(x) for x in images]), grads[1].split([len(x) for x in texts])
    for i, part in enumerate(micro):
        last = i == chunks - 1
        rng_restore(states[i])
        with (contextlib.nullcontext() if last else accelerator.no_sync(prepared)):
            out = prepared(**part)
            # Scale and bias take their whole-batch gradient once (on the last pass); 0 * x keeps them in
            # the graph of every pass so DDP sees every parameter used.
            surrogate = (out.image_embeds * g_image[i]).sum() + (out.text_embeds * g_text[i]).sum()
            surrogate = surrogate + out.logit_scale * (grads[2] if last else 0.0)
            if bias is not None:
                surrogate = surrogate + out.logit_bias * (grads[3] if last else 0.0)
            accelerator.backward(surrogate)
    rng_restore(after)
    return float(loss.detach())


def split_inputs(inputs: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """A batch of model inputs cut into `chunks` micro-batches along the batch dimension."""
    if chunks == 1:
        return [inputs]
    pieces = {k: v.chunk(chunks) for k, v in inputs.items()}
    return [{k: pieces[k][i] for k in inputs} for i in range(len(next(iter(pieces.values()))))]


def rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The CPU (and CUDA) torch RNG states, to replay a forward pass with the same dropout masks."""
    return torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def rng_restore(snapshot: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    """Inverse of rng_snapshot."""
    torch.random.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state_all(snapshot[1])
