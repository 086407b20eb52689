"""Deprecated: GSC's positive-pair probability is :meth:`hf_mmsel.losses.PairLoss.positive_prob` of the step's
loss (SigLIP's sigmoid loss: :class:`~hf_mmsel.losses.SigmoidPairLoss`, ``p_i = σ(t·cos(v_i, u_i) + b)``)."""

from __future__ import annotations

import warnings

import torch

from ..losses import SigmoidPairLoss

__all__ = ["sigmoid_positive_probability"]


def sigmoid_positive_probability(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
) -> torch.Tensor:
    """Deprecated: ``SigmoidPairLoss(logit_bias).positive_prob(image_embeds, text_embeds, logit_scale)``:
    ``p_i = σ(t·cos(v_i, u_i) + b)`` for L2-normalised pairs ``[B, d]``; ``logit_bias=None`` means ``b = 0``."""
    warnings.warn("sigmoid_positive_probability is deprecated: use hf_mmsel.losses.SigmoidPairLoss(logit_bias)"
                  ".positive_prob", DeprecationWarning, stacklevel=2)
    return SigmoidPairLoss(logit_bias).positive_prob(image_embeds, text_embeds, logit_scale)
