"""Deprecated: the loss classes of :mod:`hf_mmsel.losses` replace this module.

``PairLoss(loss_type, logit_bias)`` builds :class:`~hf_mmsel.losses.SoftmaxPairLoss` /
:class:`~hf_mmsel.losses.SigmoidPairLoss`; :func:`prepare_model_for_loss` and :func:`pair_loss_for` are
``get_pair_loss(loss_type).prepare_model(model)`` and ``get_pair_loss(loss_type).for_model(model)``.
"""

from __future__ import annotations

import warnings

from .losses import (
    PAIR_LOSSES,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    PairLoss,
    check_loss_type,
    get_pair_loss,
    init_sigmoid_logit_parameters,
)

__all__ = [
    "LOSS_TYPES",
    "PairLoss",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "check_loss_type",
    "init_sigmoid_logit_parameters",
    "pair_loss_for",
    "prepare_model_for_loss",
]

LOSS_TYPES = tuple(PAIR_LOSSES)  # the built-in losses; hf_mmsel.losses.PAIR_LOSSES holds every registered one


def prepare_model_for_loss(model, loss_type: str, *, logit_scale_max: float | None = None) -> list[str]:
    """Deprecated: ``get_pair_loss(loss_type).prepare_model(model, logit_scale_max=...)``."""
    warnings.warn("prepare_model_for_loss is deprecated: use hf_mmsel.losses.get_pair_loss(loss_type)"
                  ".prepare_model(model)", DeprecationWarning, stacklevel=2)
    return get_pair_loss(loss_type).prepare_model(model, logit_scale_max=logit_scale_max)


def pair_loss_for(model, loss_type: str) -> PairLoss:
    """Deprecated: ``get_pair_loss(loss_type).for_model(model)``."""
    warnings.warn("pair_loss_for is deprecated: use hf_mmsel.losses.get_pair_loss(loss_type).for_model(model)",
                  DeprecationWarning, stacklevel=2)
    return get_pair_loss(loss_type).for_model(model)
