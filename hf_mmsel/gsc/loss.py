"""The GSC training objective for a dual encoder (docs/design.md, GSC §3 step 8, §12.1-12.2).

    L = (1/B) Σ_i w_i · ℓ_i + γ · (1/B) Σ_i w_i · ℓ^str_i

with ``ℓ_i`` the trainer's per-pair contrastive loss (``½(ℓ^i2t_i + ℓ^t2i_i)`` of ``S = s · V Uᵀ`` for
InfoNCE, or SigLIP's sigmoid loss) and ``ℓ^str`` the structure InfoNCE over anchor-weighted intra-modal profiles
(see :mod:`hf_mmsel.gsc.structure`). Weights only remove a pair as a positive and (through ``w_k``) as an anchor; it
still serves as a negative in other rows, as in GSC. Gradients flow through the embeddings (both as queries and as
in-batch anchors); weights and bank anchors are detached.

One implementation: :func:`gsc_terms` (structure loss, detached ``c`` and ``p``) is what
:class:`~hf_mmsel.gsc.hook.GSCHook` computes in the trainer, whose ``ℓ_i`` is
:meth:`~hf_mmsel.losses.PairLoss.per_sample` with negatives gathered across ranks. :func:`gsc_loss`
is the same objective for one process (local negatives): exactly the trainer's loss at world size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import PairLoss, SigmoidPairLoss, SoftmaxPairLoss
from .structure import (
    StructureConfig,
    self_exclusion_mask,
    structure_consistency,
    structure_infonce,
    structure_matching,
    structure_profiles,
)


@dataclass
class GSCTerms:
    """One step's GSC terms: ``structure_loss`` ``(1/B) Σ_a w_a ℓ^str_a`` (differentiable), ``consistency`` ``c``
    and ``positive_prob`` ``p``, detached float32 (B,) tensors for :meth:`GSCBuffers.record`."""

    structure_loss: torch.Tensor
    consistency: torch.Tensor
    positive_prob: torch.Tensor


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
    """``(1/B) Σ_i w_i · ½(ℓ^i2t_i + ℓ^t2i_i)`` for given square logits (docs/design.md, GSC §3 step 2; divided by B,
    not Σw). A logits-level helper; :func:`gsc_loss` and the trainer compute ``ℓ_i`` with
    :meth:`~hf_mmsel.losses.PairLoss.per_sample`."""
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
    """``((1/B) Σ_a w_a ℓ^str_a, detached c)`` for L2-normalised (B, d) embeddings with in-batch anchors (self excluded,
    at most ``structure.max_batch_anchors``) plus optional detached bank anchors (docs/design.md, GSC §3 steps 4-7)."""
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


def gsc_terms(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    weights: torch.Tensor,
    prob_logit_scale: torch.Tensor | float,
    anchor_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    anchor_weights: torch.Tensor | None = None,
    *,
    sample_idx: torch.Tensor | None = None,
    anchor_sample_idx: torch.Tensor | None = None,
    structure: StructureConfig | None = None,
    pair_loss: PairLoss | None = None,
) -> GSCTerms:
    """GSC's per-step terms for L2-normalised local (B, d) embeddings with weights ``w`` (docs/design.md, GSC §3 steps
    3-7): the structure loss and ``c`` (:func:`structure_terms`), and ``p`` = :meth:`pair_loss.positive_prob
    <hf_mmsel.losses.PairLoss.positive_prob>` with scale ``s_p = prob_logit_scale`` (default
    :class:`~hf_mmsel.losses.SoftmaxPairLoss`: the softmax probability of the positive in the local B×B logits ``s_p · V
    Uᵀ``, as GSC scores ``p`` inside its B = 128 batch; SigLIP's sigmoid loss: the pair's own match probability
    ``σ(s_p·cos_ii + b)``). Used by :class:`GSCHook` and :func:`gsc_loss`."""
    structure_loss, consistency = structure_terms(
        image_embeds, text_embeds, weights, anchor_embeds, anchor_weights, sample_idx=sample_idx,
        anchor_sample_idx=anchor_sample_idx, structure=structure,
    )
    with torch.no_grad():
        v, u = image_embeds.detach(), text_embeds.detach()
        loss = pair_loss if pair_loss is not None else SoftmaxPairLoss()
        p = loss.detached().positive_prob(v, u, prob_logit_scale)
    return GSCTerms(structure_loss, consistency.detach(), p.detach())


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
    logit_bias: torch.Tensor | float | None = None,
    pair_loss: PairLoss | None = None,
) -> GSCLossOutput:
    """Weighted contrastive loss + ``gamma`` · structure loss, plus detached ``c`` and ``p`` (docs/design.md, GSC §3,
    §12.2): the trainer's ``ContrastiveTrainingArguments(gsc=True)`` objective for one process (local negatives; the
    trainer gathers them across ranks), built from the same :func:`gsc_terms`.

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
            comparable when the learned scale grows (docs/design.md, GSC §12.1, "p with big batches").
        logit_bias: the bias ``b`` of SigLIP's sigmoid loss: short for ``pair_loss=SigmoidPairLoss(b)``.
        pair_loss: the :class:`~hf_mmsel.losses.PairLoss` giving ``ℓ_i`` and ``p_i`` (``None``: softmax InfoNCE, or
            the sigmoid loss with ``logit_bias``).
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

    if pair_loss is None:
        pair_loss = SoftmaxPairLoss() if logit_bias is None else SigmoidPairLoss(torch.as_tensor(logit_bias))
    elif logit_bias is not None:
        raise ValueError("pass the logit_bias inside pair_loss, not both")
    v = F.normalize(image_embeds, dim=-1)
    u = F.normalize(text_embeds, dim=-1)
    contrastive = (pair_loss.per_sample(v, u, logit_scale) * weights).mean()  # the trainer's weighted mean
    terms = gsc_terms(
        v, u, weights, logit_scale if prob_logit_scale is None else prob_logit_scale, anchor_embeds,
        anchor_weights, sample_idx=sample_idx, anchor_sample_idx=anchor_sample_idx, structure=cfg,
        pair_loss=pair_loss,
    )
    return GSCLossOutput(
        loss=contrastive + gamma * terms.structure_loss,
        contrastive_loss=contrastive,
        structure_loss=terms.structure_loss,
        consistency=terms.consistency,
        positive_prob=terms.positive_prob,
    )
