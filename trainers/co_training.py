"""GSC+ co-training step (docs/design.md, GSC §6): every network of a :class:`~hf_mmsel.models.CoTrainedDualEncoder`
gets its own per-pair loss on the same kept pairs, with the hooks' terms for ``ctx.network = k`` (GSC+: the peer's
``w``, its own ``c``/``p``); the step loss is the sum over networks, so each network receives exactly its own
gradient."""

from __future__ import annotations

from typing import Callable

from hf_mmsel.losses import get_pair_loss
from hf_mmsel.hooks import LossTerms, StepContext
from hf_mmsel.models import logit_scale_of, unwrap_model

__all__ = ["co_training_loss"]


def co_training_loss(model, inputs, ctx: StepContext, *, per_sample_loss: Callable, loss_terms: Callable | None,
                     weighted_mean: Callable, logit_scale_max: float, loss_type: str = "softmax"):
    """``(loss, logs, per_network_outputs)`` for one step of GSC+. ``per_sample_loss(image, text, scale, pair_loss)``
    is the trainer's contrastive loss (network k's own logit scale and, for the sigmoid loss, its own bias);
    ``loss_terms`` the hook chain's (``None`` outside training)."""
    out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"))  # the wrapped forward: per-network embeddings
    networks = unwrap_model(model).networks
    loss, logs, per_network = 0.0, {}, []
    for k, (image, text) in enumerate(zip(out.image_embeds, out.text_embeds)):
        scale = logit_scale_of(networks[k], max_scale=logit_scale_max)
        ctx.loss = get_pair_loss(loss_type).for_model(networks[k])
        per_sample = per_sample_loss(image, text, scale, ctx.loss)
        ctx.network = k
        try:
            terms = (loss_terms(image, text, scale, inputs["sample_idx"], per_sample, ctx) if loss_terms
                     else LossTerms())
        finally:
            ctx.network = None
        net_loss = weighted_mean(per_sample, terms)
        loss = loss + net_loss
        logs.update(terms.logs)
        logs[f"loss_net{k}"] = net_loss.detach()
        logs[f"logit_scale_net{k}"] = scale.detach()
        per_network.append({"image_embeds": image, "text_embeds": text, "per_sample_loss": per_sample})
    return loss, logs, per_network
