"""The GSC training objective for a dual encoder (gsc.md §3 step 8, §12.1-12.2).

    L = (1/B) Σ_i w_i · ½(ℓ^i2t_i + ℓ^t2i_i) + γ · (1/B) Σ_i w_i · ℓ^str_i

with ``ℓ^i2t, ℓ^t2i`` the per-sample InfoNCE terms of ``S = s · V Uᵀ`` and ``ℓ^str`` the structure InfoNCE over
anchor-weighted intra-modal profiles (see :mod:`hf_mmsel.gsc.structure`). Weights only remove a pair as a
positive and (through ``w_k``) as an anchor; it still serves as a negative in other rows, as in GSC. Gradients
flow through the embeddings (both as queries and as in-batch anchors); weights and bank anchors are detached.
The detached consistency ``c`` and positive probability ``p`` are returned for the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .structure import (
    StructureConfig,
    positive_probability,
    self_exclusion_mask,
    structure_consistency,
    structure_infonce,
    structure_matching,
    structure_profiles,
)


@dataclass
class GSCLossOutput:
    """``loss`` (scalar, differentiable) = ``contrastive_loss + gamma * structure_loss``; ``consistency`` ``c`` and
    ``positive_prob`` ``p`` are detached (B,) tensors for :meth:`GSCBuffers.record`."""

    loss: torch.Tensor
    contrastive_loss: torch.Tensor
    structure_loss: torch.Tensor
    consistency: torch.Tensor
    positive_prob: torch.Tensor


def weighted_bidirectional_infonce(logits_per_image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(1/B) Σ_i w_i · ½(ℓ^i2t_i + ℓ^t2i_i)`` for square logits (gsc.md §3 step 2; divided by B, not Σw)."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    per_sample = 0.5 * (
        F.cross_entropy(logits_per_image, target, reduction="none")
        + F.cross_entropy(logits_per_image.T, target, reduction="none")
    )
    return (weights * per_sample).mean()


def _select_batch_anchors(weights: torch.Tensor, max_anchors: int | None) -> torch.Tensor:
    """Indices of the in-batch anchors: all, or the ``max_anchors`` highest-weight ones (stable order)."""
    b = weights.shape[0]
    if max_anchors is None or max_anchors >= b:
        return torch.arange(b, device=weights.device)
    return torch.sort(weights, descending=True, stable=True).indices[:max_anchors]


def structure_terms(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    weights: torch.Tensor,
    anchor_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    anchor_weights: torch.Tensor | None = None,
    *,
    sample_idx: torch.Tensor | None = None,
    anchor_sample_idx: torch.Tensor | None = None,
    structure: StructureConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1/B) Σ_a w_a ℓ^str_a, detached c)`` for L2-normalised (B, d) embeddings with in-batch anchors (self
    excluded, at most ``structure.max_batch_anchors``) plus optional detached bank anchors (gsc.md §3 steps 4-7)."""
    cfg = structure or StructureConfig()
    v, u = image_embeds, text_embeds
    b = v.shape[0]
    weights = weights.detach().to(v.dtype)
    batch_anchor = _select_batch_anchors(weights, cfg.max_batch_anchors)
    anchor_v, anchor_u, anchor_w = v[batch_anchor], u[batch_anchor], weights[batch_anchor]
    exclude = torch.arange(b, device=v.device).reshape(-1, 1) == batch_anchor.reshape(1, -1)
    if anchor_embeds is not None:
        if anchor_weights is None or sample_idx is None or anchor_sample_idx is None:
            raise ValueError("anchor_embeds needs anchor_weights, sample_idx and anchor_sample_idx as well")
        bank_v = F.normalize(anchor_embeds[0].detach().to(v), dim=-1)
        bank_u = F.normalize(anchor_embeds[1].detach().to(u), dim=-1)
        anchor_v, anchor_u = torch.cat([anchor_v, bank_v]), torch.cat([anchor_u, bank_u])
        anchor_w = torch.cat([anchor_w, anchor_weights.detach().to(anchor_w)])
        bank_self = self_exclusion_mask(sample_idx.to(v.device), anchor_sample_idx.to(v.device))
        exclude = torch.cat([exclude, bank_self], dim=1)
    if anchor_v.shape[0] == 0:
        raise ValueError("GSC structure needs at least one anchor: enable in-batch anchors or pass a bank")
    profiles = structure_profiles(
        v, u, anchor_v, anchor_u, anchor_w, exclude, similarity=cfg.similarity, temperature=cfg.temperature
    )
    matching = structure_matching(
        profiles, centered=cfg.centered, matching=cfg.matching, matching_temperature=cfg.matching_temperature
    )
    structure_loss = (weights * structure_infonce(matching)).mean()
    with torch.no_grad():
        consistency = structure_consistency(profiles, centered=cfg.centered).float()
    return structure_loss, consistency.detach()


def gsc_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
    anchor_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    anchor_weights: torch.Tensor | None = None,
    gamma: float = 0.05,
    *,
    sample_idx: torch.Tensor | None = None,
    anchor_sample_idx: torch.Tensor | None = None,
    structure: StructureConfig | None = None,
    prob_logit_scale: torch.Tensor | float | None = None,
) -> GSCLossOutput:
    """Weighted bi-InfoNCE + ``gamma`` · structure loss, plus detached ``c`` and ``p`` (gsc.md §3, §12.2).

    Args:
        image_embeds, text_embeds: (B, d) embeddings of the B pairs (normalised here).
        logit_scale: the multiplier ``s = 1/τ`` of the cosines (e.g. ``model.logit_scale.exp()`` or ``1/0.07``).
        weights: (B,) GSC weights ``w`` of the batch (GSC+: the peer network's); ``None`` means all ones.
        anchor_embeds: optional bank anchors ``(image (M, d), text (M, d))``, detached, e.g.
            :meth:`AnchorBank.anchors`; used in addition to the in-batch anchors.
        anchor_weights: (M,) weights of the bank anchors (required with ``anchor_embeds``).
        gamma: weight of the structure loss.
        sample_idx, anchor_sample_idx: dataset indices of the batch and of the bank anchors, so that a sample
            found in the bank is excluded from its own profile (required with ``anchor_embeds``).
        structure: profile / matching settings; default :class:`StructureConfig`.
        prob_logit_scale: scale used for ``p`` only (``None``: ``logit_scale``); a fixed ``1/0.07`` keeps ``p``
            comparable when the learned scale grows (gsc.md §12.1, "p with big batches").
    """
    cfg = structure or StructureConfig()
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds and text_embeds must both be (B, d), got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    b = image_embeds.shape[0]
    if weights is None:
        weights = torch.ones(b, device=image_embeds.device, dtype=image_embeds.dtype)
    if weights.shape != (b,):
        raise ValueError(f"weights must have shape ({b},), got {tuple(weights.shape)}")
    weights = weights.detach().to(image_embeds.dtype)

    v = F.normalize(image_embeds, dim=-1)
    u = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * (v @ u.T)
    contrastive = weighted_bidirectional_infonce(logits, weights)
    with torch.no_grad():
        p_logits = logits if prob_logit_scale is None else prob_logit_scale * (v @ u.T)
        positive_prob = positive_probability(p_logits.float())

    structure_loss, consistency = structure_terms(
        v, u, weights, anchor_embeds, anchor_weights, sample_idx=sample_idx, anchor_sample_idx=anchor_sample_idx,
        structure=cfg,
    )
    return GSCLossOutput(
        loss=contrastive + gamma * structure_loss,
        contrastive_loss=contrastive,
        structure_loss=structure_loss,
        consistency=consistency.detach(),
        positive_prob=positive_prob.detach(),
    )
