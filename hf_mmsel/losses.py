"""Contrastive losses for dual encoders (plain torch, no Trainer dependency).

``clip_loss_per_sample`` is CLIP's symmetric InfoNCE in the *local-loss* form of open_clip
(``local_loss=True, gather_with_grad=True``): each rank scores its ``k`` local rows against the ``W*k`` global
columns gathered from every rank, and returns one loss per local pair,

    l_i = 1/2 [ CE(s * v_i U_all^T, i + rank*k) + CE(s * u_i V_all^T, i + rank*k) ],

with ``v``/``u`` the L2-normalised image/text embeddings and ``s`` the (exponentiated) logit scale. The mean of
``l`` over all ranks equals the one-process loss on the concatenated global batch, and with an autograd-aware
gather (``gather_with_grad``) plus DDP's gradient averaging the gradients match too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["GatherFn", "clip_loss_per_sample", "gather_with_grad", "gather_no_grad"]


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
