"""Which contrastive loss a dual encoder trains with, and the sigmoid loss's learnable temperature and bias.

``loss_type`` is ``"softmax"`` (CLIP's symmetric InfoNCE, :func:`~hf_mmsel.losses.clip_loss_per_sample`) or
``"sigmoid"`` (SigLIP's pairwise sigmoid loss, :func:`~hf_mmsel.losses.sigmoid_loss_per_sample`). Both give one
loss per kept pair, which selection (``small_loss``/``big_loss``) ranks and GSC weights with ``w``.

The sigmoid loss has a log-temperature ``t'`` (``t = exp(t')``) and a bias ``b``. They are the model's own
``logit_scale`` / ``logit_bias`` parameters when it has them (``SiglipModel``; ``CLIPModel`` and
``SmallDualEncoderModel`` have ``logit_scale`` only); :func:`prepare_model_for_loss` registers the missing ones on
the model as shape-``[1]`` parameters initialised as in the SigLIP paper (``t' = log 10``, ``b = -10``). Being model
parameters, they are trained by the Trainer's optimizer, averaged across ranks by DDP, written to every checkpoint
with the weights and restored on resume (``save_pretrained`` keeps them too; a plain ``CLIPModel.from_pretrained``
ignores the extra ``logit_bias`` key).

A freshly constructed ``SiglipModel`` has ``logit_scale = logit_bias = 0`` (its ``_init_weights`` zeroes both):
:func:`init_sigmoid_logit_parameters` sets the paper's values (``build_dual_encoder(architecture="siglip")`` does
so), and :func:`prepare_model_for_loss` warns when it sees the untouched zeros.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .losses import GatherFn, clip_loss_per_sample, sigmoid_loss_per_sample

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

logger = logging.getLogger(__name__)

LOSS_TYPES = ("softmax", "sigmoid")
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # t' (the paper's t = 10)
SIGLIP_LOGIT_BIAS_INIT = -10.0  # b


def check_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    return loss_type


@dataclass(frozen=True)
class PairLoss:
    """The per-pair contrastive loss of a step: its kind and, for ``"sigmoid"``, the bias ``b`` (the logit scale
    travels with the embeddings). ``PairLoss()`` is the softmax InfoNCE."""

    loss_type: str = "softmax"
    logit_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_loss_type(self.loss_type)
        if self.loss_type == "softmax" and self.logit_bias is not None:
            raise ValueError("the softmax InfoNCE has no logit_bias; use loss_type='sigmoid'")

    @property
    def is_sigmoid(self) -> bool:
        return self.loss_type == "sigmoid"

    def per_sample(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float, *,
        gather_fn: GatherFn | None = None, rank: int = 0,
    ) -> torch.Tensor:
        """``[k]`` per-pair losses of the local pairs against the gathered ones (see :mod:`hf_mmsel.losses`)."""
        if self.is_sigmoid:
            return sigmoid_loss_per_sample(image_embeds, text_embeds, logit_scale, self.logit_bias,
                                           gather_fn=gather_fn, rank=rank)
        return clip_loss_per_sample(image_embeds, text_embeds, logit_scale, gather_fn=gather_fn, rank=rank)

    def detached(self) -> "PairLoss":
        """The same loss with a gradient-free bias (for no-grad scoring)."""
        bias = self.logit_bias.detach() if isinstance(self.logit_bias, torch.Tensor) else self.logit_bias
        return PairLoss(self.loss_type, bias)

    def logs(self) -> dict[str, torch.Tensor]:
        """``{"logit_bias": b}`` for the sigmoid loss (for the training logs), else empty."""
        if isinstance(self.logit_bias, torch.Tensor):
            return {"logit_bias": self.logit_bias.detach().float().reshape(())}
        return {}


def _unwrap(model):
    from .models.features import unwrap_model

    return unwrap_model(model)


def _networks(model) -> list:
    from .models.co_trained import CoTrainedDualEncoder

    inner = _unwrap(model)
    return list(inner.networks) if isinstance(inner, CoTrainedDualEncoder) else [inner]


def _device_of(module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def init_sigmoid_logit_parameters(model, logit_scale: float = SIGLIP_LOGIT_SCALE_INIT,
                                  logit_bias: float = SIGLIP_LOGIT_BIAS_INIT) -> None:
    """Set ``model.logit_scale = t'`` and ``model.logit_bias = b`` in place (SigLIP's init by default), e.g. after
    constructing a ``SiglipModel`` from a config."""
    inner = _unwrap(model)
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        param = getattr(inner, name, None)
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{type(inner).__name__} has no {name} parameter")
        param.fill_(value)


def prepare_model_for_loss(model, loss_type: str, *, logit_scale_max: float | None = None) -> list[str]:
    """Make ``model`` ready for ``loss_type``; returns the names of the parameters it registered.

    ``"sigmoid"``: registers ``logit_scale`` (``t' = log 10``) and/or ``logit_bias`` (``b = -10``) as shape-``[1]``
    trainable parameters on every network that lacks them (a :class:`~hf_mmsel.models.CoTrainedDualEncoder`: on
    each network). Raises when an existing ``exp(logit_scale)`` exceeds ``logit_scale_max`` (training would clamp
    it, e.g. a pretrained SigLIP's t of about 118 under CLIP's clamp of 100); warns on a fresh ``SiglipModel``'s
    zero scale and bias. ``"softmax"``: nothing to do.
    """
    if check_loss_type(loss_type) == "softmax":
        return []
    added: list[str] = []
    networks = _networks(model)
    for k, net in enumerate(networks):
        prefix = f"networks.{k}." if len(networks) > 1 else ""
        device, fresh = _device_of(net), []
        for name, init in (("logit_scale", SIGLIP_LOGIT_SCALE_INIT), ("logit_bias", SIGLIP_LOGIT_BIAS_INIT)):
            current = getattr(net, name, None)
            if current is None:
                net.register_parameter(name, torch.nn.Parameter(torch.full((1,), init, device=device)))
                fresh.append(prefix + name)
            elif not isinstance(current, torch.Tensor):
                raise TypeError(f"{type(net).__name__}.{name} is a {type(current).__name__}, not a parameter; the "
                                "sigmoid loss needs a tensor logit_scale / logit_bias")
        scale, bias = net.logit_scale, net.logit_bias
        if logit_scale_max is not None and float(scale.detach().max().exp()) > logit_scale_max * (1 + 1e-6):
            raise ValueError(
                f"{type(net).__name__}'s logit scale exp(logit_scale) = {float(scale.detach().max().exp()):.1f} exceeds "
                f"logit_scale_max = {logit_scale_max}: training would clamp it; raise logit_scale_max"
            )
        added += fresh
        if not fresh and bool((scale == 0).all()) and bool((bias == 0).all()):
            logger.warning(
                "%s has logit_scale = logit_bias = 0, the values of a freshly constructed SiglipModel; SigLIP starts "
                "from t' = log 10, b = -10: call hf_mmsel.contrastive_loss.init_sigmoid_logit_parameters(model) (or "
                "build it with build_dual_encoder(architecture='siglip'))", type(net).__name__,
            )
    return added


def pair_loss_for(model, loss_type: str) -> PairLoss:
    """The :class:`PairLoss` of ``model`` for ``loss_type``: softmax, or sigmoid with the model's (differentiable)
    ``logit_bias`` (registered by :func:`prepare_model_for_loss`). A co-trained ensemble gets the mean of its
    networks' biases (as its scoring forward uses their mean logit scale)."""
    if check_loss_type(loss_type) == "softmax":
        return PairLoss()
    biases = []
    for net in _networks(model):
        bias = getattr(net, "logit_bias", None)
        if not isinstance(bias, torch.Tensor):
            raise ValueError(
                f"loss_type='sigmoid' needs a logit_bias parameter on {type(net).__name__}: call "
                "hf_mmsel.contrastive_loss.prepare_model_for_loss(model, 'sigmoid') first (ContrastiveTrainer does)"
            )
        biases.append(bias.reshape(()))
    return PairLoss("sigmoid", biases[0] if len(biases) == 1 else torch.stack(biases).mean())
