"""GSC as a :class:`~hf_mmsel.hooks.BatchHook`: per-sample weights + structure loss at the data boundary.

Thin adapter over the core (gsc.md §12.2). Per training step, on the kept pairs of the local batch:
weights ``w[sample_idx]`` for the trainer's per-sample InfoNCE, ``extra_loss = γ · structure loss`` (in-batch
anchors + optional :class:`AnchorBank`), and ``(sample_idx, c, p)`` gathered across ranks into replicated
:class:`GSCBuffers`; ``p`` uses the local batch's logits, as GSC (B = 128 per step). At epoch end the
buffers run the GMM/EMA update, a deterministic function of identical buffers, followed by a broadcast from
rank 0 for safety. Nothing is recorded when gradients are disabled (evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..hooks import BatchHook, Dist, LossTerms, StepContext
from .anchors import AnchorBank
from .buffers import GSCBuffers
from .loss import structure_terms
from .structure import StructureConfig, positive_probability


class GSCHook(BatchHook):
    """GSC weighting hook; combine with selection via ``HookList`` (selection first)."""

    def __init__(
        self,
        gamma: float = 0.05,
        structure: StructureConfig | None = None,
        beta: float = 0.7,
        bank_size: int = 0,
        bank_min_weight: float = 0.5,
        gmm_max_iter: int = 10,
        gmm_tol: float = 1e-2,
        gmm_reg_covar: float = 5e-4,
        max_fit_samples: int = 200_000,
        prob_posterior: bool = False,
        prob_logit_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.gamma, self.structure, self.beta = gamma, structure or StructureConfig(), beta
        self.bank_size, self.bank_min_weight = bank_size, bank_min_weight
        self.gmm = dict(max_iter=gmm_max_iter, tol=gmm_tol, reg_covar=gmm_reg_covar, max_fit_samples=max_fit_samples)
        self.prob_posterior, self.prob_logit_scale, self.seed = prob_posterior, prob_logit_scale, seed
        self.buffers: GSCBuffers | None = None
        self.bank: AnchorBank | None = None
        self._device: torch.device | None = None

    def setup(self, num_samples: int, device: torch.device) -> None:
        if self.buffers is None or self.buffers.num_samples != num_samples:
            self.buffers = GSCBuffers(num_samples, device=device)
        self._device = torch.device(device)

    def _require_buffers(self) -> GSCBuffers:
        if self.buffers is None:
            raise RuntimeError("GSCHook.setup(num_samples, device) must run before training")
        return self.buffers

    def _ensure_bank(self, dim: int) -> AnchorBank | None:
        if self.bank_size > 0 and self.bank is None:
            self.bank = AnchorBank(self.bank_size, dim, min_weight=self.bank_min_weight, device=self._device)
        return self.bank

    def loss_terms(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        sample_idx: torch.Tensor,
        per_sample_loss: torch.Tensor,
        ctx: StepContext,
    ) -> LossTerms:
        buffers = self._require_buffers()
        weights = buffers.weights_for(sample_idx).to(image_embeds.dtype)
        v, u = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        bank = self._ensure_bank(v.shape[1])
        anchor_kwargs = {}
        if bank is not None and len(bank):
            bank_v, bank_u, bank_w, bank_idx = bank.anchors(buffers.weight)
            anchor_kwargs = dict(anchor_embeds=(bank_v, bank_u), anchor_weights=bank_w, anchor_sample_idx=bank_idx)
        structure_loss, consistency = structure_terms(
            v, u, weights, sample_idx=sample_idx, structure=self.structure, **anchor_kwargs
        )
        logs = {"gsc_weight_mean": weights.mean().detach(), "gsc_structure_loss": structure_loss.detach()}
        if torch.is_grad_enabled():  # training step: record gathered scores, refresh the bank
            with torch.no_grad():
                scale = logit_scale if self.prob_logit_scale is None else self.prob_logit_scale
                p = positive_probability((scale * (v @ u.T)).float())
                dist = ctx.dist
                all_idx = dist.gather(sample_idx.to(v.device))
                buffers.record(all_idx, dist.gather(consistency), dist.gather(p))
                if bank is not None:
                    all_w = dist.gather(weights)
                    bank.update(dist.gather(v.detach()), dist.gather(u.detach()), all_w, all_idx,
                                priority=all_w * dist.gather(p))
        return LossTerms(weights=weights, extra_loss=self.gamma * structure_loss, logs=logs)

    def on_epoch_end(self, epoch: int, dist: Dist) -> dict[str, float]:
        buffers = self._require_buffers()
        stats = buffers.epoch_update(
            beta=self.beta, seed=self.seed + epoch, prob_posterior=self.prob_posterior,
            broadcast_fn=dist.broadcast if dist.world_size > 1 else None, **self.gmm,
        )
        if stats.num_seen == 0:
            return {}
        return {"gsc_mean_weight": stats.mean_weight, "gsc_clean_fraction": stats.clean_fraction,
                "gsc_num_updated": float(stats.num_seen)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"buffers.{k}": v for k, v in self._require_buffers().state_dict().items()}
        if self.bank is not None:
            state.update({f"bank.{k}": v for k, v in self.bank.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._require_buffers().load_state_dict(
            {k[len("buffers."):]: v for k, v in state.items() if k.startswith("buffers.")}
        )
        bank_state = {k[len("bank."):]: v for k, v in state.items() if k.startswith("bank.")}
        if bank_state:
            bank = self._ensure_bank(int(bank_state["image_embeds"].shape[1]))
            if bank is None:
                raise ValueError("checkpoint holds a GSC anchor bank but this GSCHook has bank_size=0")
            bank.load_state_dict(bank_state)
