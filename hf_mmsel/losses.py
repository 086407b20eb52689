"""Contrastive losses for dual encoders (plain torch, no Trainer dependency).

``clip_loss_per_sample`` is CLIP's symmetric InfoNCE in the *local-loss* form of open_clip
(``local_loss=True, gather_with_grad=True``): each rank scores its ``k`` local rows against the ``W*k`` global
columns gathered from every rank, and returns one loss per local pair,

    l_i = 1/2 [ CE(s * v_i U_all^T, i + rank*k) + CE(s * u_i V_all^T, i + rank*k) ],

with ``v``/``u`` the L2-normalised image/text embeddings and ``s`` the (exponentiated) logit scale. The mean of
``l`` over all ranks equals the one-process loss on the concatenated global batch, and with an autograd-aware
gather (``gather_with_grad``) plus DDP's gradient averaging the gradients match too.

``sigmoid_loss_per_sample`` is SigLIP's pairwise sigmoid loss (Zhai et al., arXiv 2303.15343) in the same local
form: rank ``r`` scores its ``k`` local images against the ``W*k`` gathered texts and returns one loss per local
image (its row of pair terms, the paper's per-image normalisation),

    l_i = sum_j -log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if j == r*k + i else -1,

with ``t`` the (exponentiated) logit scale and ``b`` the logit bias. Every (image, text) pair of the global batch
appears in exactly one row, so ``mean(l)`` over all ranks is the paper's ``-(1/|B|) sum_i sum_j log sigmoid(...)``;
texts need to be gathered, images do not.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["GatherFn", "clip_loss_per_sample", "gather_with_grad", "gather_no_grad", "sigmoid_loss_per_sample"]


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` [k, ...] from every rank into [W*k, ...]; gradients flow back to each rank's shard
    (the backward is a reduce-scatter of the summed gradients). Identity in a single process."""
    world, _ = _world()
    if world == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without autograd (for scores, indices, flags). Identity in a single process."""
    world, _ = _world()
    if world == 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor)
    return torch.cat(out, dim=0)


def clip_loss_per_sample(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather_fn: GatherFn | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Per-pair symmetric InfoNCE of the local rows against the global columns.

    Args:
        image_embeds, text_embeds: ``[k, d]`` L2-normalised embeddings of this rank's ``k`` pairs.
        logit_scale: the multiplicative temperature ``s = exp(t)`` (already clamped), a scalar.
        gather_fn: maps a local ``[k, d]`` tensor to the global ``[W*k, d]`` one (rank-major order). ``None``:
            single process. Use :func:`gather_with_grad` for correct gradients across ranks.
        rank: this rank's position in the gathered order (its positives sit at ``rank*k + i``).

    Returns:
        ``[k]`` float32 losses ``l_i`` (mean of the image->text and text->image cross-entropies).
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must both be [k, d]; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    k = image_embeds.shape[0]
    if gather_fn is None:
        all_images, all_texts = image_embeds, text_embeds
    else:
        all_images, all_texts = gather_fn(image_embeds), gather_fn(text_embeds)
    targets = torch.arange(k, device=image_embeds.device) + rank * k
    logits_i2t = (logit_scale * image_embeds @ all_texts.T).float()
    logits_t2i = (logit_scale * text_embeds @ all_images.T).float()
    return 0.5 * (
        F.cross_entropy(logits_i2t, targets, reduction="none") + F.cross_entropy(logits_t2i, targets, reduction="none")
    )


def sigmoid_loss_per_sample(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
    gather_fn: GatherFn | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Per-image SigLIP sigmoid loss of the local images against the global texts.

    Args:
        image_embeds, text_embeds: ``[k, d]`` L2-normalised embeddings ``x``/``y`` of this rank's ``k`` pairs.
        logit_scale: the multiplicative temperature ``t = exp(t')`` (already clamped), a scalar or shape ``[1]``.
        logit_bias: the bias ``b`` (scalar or ``[1]``); ``None`` means no bias (``b = 0``).
        gather_fn: maps the local ``[k, d]`` texts to the global ``[W*k, d]`` ones (rank-major order). ``None``:
            single process. Use :func:`gather_with_grad` so that gradients reach the texts' owners.
        rank: this rank's position in the gathered order (image ``i``'s positive text sits at ``rank*k + i``).

    Returns:
        ``[k]`` losses ``l_i = sum_j -log sigmoid(z_ij (t x_i.y_j + b))`` (at least float32); their mean over all
        ranks is the paper's loss. Used per pair by selection (``small_loss``/``big_loss``) and GSC weights.
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must both be [k, d]; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    k = image_embeds.shape[0]
    all_texts = text_embeds if gather_fn is None else gather_fn(text_embeds)
    if all_texts.shape[0] < (rank + 1) * k:
        raise ValueError(f"gather_fn returned {all_texts.shape[0]} texts; rank {rank} needs at least {(rank + 1) * k}")
    logits = logit_scale * image_embeds @ all_texts.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_bias is not None:
        logits = logits + logit_bias
    positives = torch.arange(k, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[positives, positives + rank * k] = 1.0
    return -F.logsigmoid(signs * logits).sum(dim=-1)
