"""GSC's positive-pair probability under SigLIP's sigmoid loss (``loss_type="sigmoid"``).

GSC's cross-modal signal ``p_i`` (gsc.md §3 step 3) is the softmax probability of the positive pair inside the
batch when the model trains with InfoNCE (:func:`~hf_mmsel.gsc.structure.positive_probability`). A model trained
with the sigmoid loss scores every pair as an independent binary match, so its own probability that pair i
matches is

    p_i = σ(t · cos(v_i, u_i) + b)

with ``t = exp(t')`` the logit scale and ``b`` the logit bias of the loss. It needs no batch softmax and does not
shrink with the batch size. Everything downstream (EMA of ``p``, ``w = min(EMA_pred, EMA_topo)``, the optional GMM
posterior of ``p``) is unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["sigmoid_positive_probability"]


def sigmoid_positive_probability(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
) -> torch.Tensor:
    """``p_i = σ(t·cos(v_i, u_i) + b)`` for L2-normalised pairs ``[B, d]``; ``logit_bias=None`` means ``b = 0``.
    Float32 ``[B]``."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(f"image and text embeddings must both be [B, d], got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    logits = logit_scale * (image_embeds.float() * text_embeds.float()).sum(-1)
    if logit_bias is not None:
        logits = logits + logit_bias
    return torch.sigmoid(logits.float())
