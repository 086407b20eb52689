"""GSC as a :class:`~hf_mmsel.hooks.BatchHook`: per-sample weights + structure loss at the data boundary.

Thin adapter over the core :func:`~hf_mmsel.gsc.loss.gsc_terms` (docs/design.md, GSC §12.2; the same function
:func:`~hf_mmsel.gsc.loss.gsc_loss` uses). Per training step, on the kept pairs of the local batch:
weights ``w[sample_idx]`` for the trainer's per-sample InfoNCE, ``extra_loss = γ · structure loss`` (in-batch
anchors + optional :class:`AnchorBank`), and ``(sample_idx, c, p)`` recorded into this rank's shard of the
:class:`GSCBuffers` (it owns its candidates); ``p`` uses the local batch's logits, as GSC (B = 128 per step), or
with SigLIP's sigmoid loss (``ctx.loss``) the pair's own match probability ``p_i = σ(t·cos_ii + b)``. At each
pass end the buffers run the GMM/EMA update, identical to the single-process result by construction (global
min/max, hashed subsample, sorted EM). The anchor bank (fixed size, not per-sample) is replicated: its pairs are
gathered from every rank, and their current weights are looked up from their owners (one all_reduce). Nothing
is recorded when gradients are disabled (evaluation).

:class:`GSCPlusHook` is GSC+ (docs/design.md, GSC §6) for a co-trained ensemble: one :class:`GSCHook` per network (own
buffers, GMM/EMA, anchor bank), called per network (``ctx.network = k``); network k's losses are weighted by its
peer's ``w`` (:class:`GSCPlusBuffers`), its ``c``/``p`` recorded into its own buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..hooks import BatchHook, Dist, LossTerms, StepContext
from ..state import StateNamespace
from .anchors import AnchorBank
from .buffers import GSCBuffers, GSCPlusBuffers
from .loss import gsc_terms
from .structure import StructureConfig


def filter_weights(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """The weights a step trains with: ``w`` where ``w >= threshold``, else 0 (the pair is filtered out: no loss, no
    anchor); ``threshold = 0`` (default) is GSC's soft weighting of every pair. The stored ``w`` stays continuous.
    Optional (``gsc_weight_threshold``): measured on the embedded benchmarks (docs/results.md), filtering at 0.5
    lifts ``w``'s AUROC above the trained model's own cosine at 40 % noise on easy-vqa but costs rSum there and
    collapses at 60 % noise and with selection (an early wrong split is never trained on again)."""
    if threshold <= 0.0:
        return weights
    return torch.where(weights >= threshold, weights, torch.zeros_like(weights))


class GSCHook(BatchHook):
    """GSC weighting hook; combine with selection via ``HookList`` (selection first). ``diagnostics``: also keep
    the last clean posterior per sample (2 B/sample more)."""

    state_kind = "gsc"

    def __init__(
        self,
        gamma: float = 0.05,
        structure: StructureConfig | None = None,
        beta: float = 0.9,
        ema_bias_correction: bool = False,
        prior_beta: float = 0.9,
        weight_threshold: float = 0.0,
        bank_size: int = 0,
        bank_min_weight: float = 0.5,
        gmm_max_iter: int = 10,
        gmm_tol: float = 1e-2,
        gmm_reg_covar: float = 5e-4,
        max_fit_samples: int = 200_000,
        prob_posterior: bool = True,
        prob_logit_scale: float | None = None,
        seed: int = 0,
        diagnostics: bool = False,
    ) -> None:
        if not 0.0 <= weight_threshold < 1.0:
            raise ValueError(f"weight_threshold must be in [0, 1), got {weight_threshold}")
        self.weight_threshold = float(weight_threshold)
        self.diagnostics = bool(diagnostics)
        self.gamma, self.structure, self.beta = gamma, structure or StructureConfig(), beta
        self.ema_bias_correction = bool(ema_bias_correction)
        if not 0.0 < prior_beta <= 1.0:
            raise ValueError(f"prior_beta must be in (0, 1], got {prior_beta}")
        self.prior_beta = float(prior_beta)
        self.bank_size, self.bank_min_weight = bank_size, bank_min_weight
        self.gmm = dict(max_iter=gmm_max_iter, tol=gmm_tol, reg_covar=gmm_reg_covar, max_fit_samples=max_fit_samples)
        self.prob_posterior, self.prob_logit_scale, self.seed = prob_posterior, prob_logit_scale, seed
        self.buffers: GSCBuffers | None = None
        self.bank: AnchorBank | None = None
        self._device: torch.device | None = None

    def setup(self, num_samples: int, device: torch.device, storage: StateNamespace | None = None) -> None:
        storage = self.use_storage(num_samples, device, storage)
        self.buffers = GSCBuffers(storage=storage.namespace("buffers"), keep_posterior=self.diagnostics,
                                  bias_correction=self.ema_bias_correction)
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
        *,
        weight_from: GSCBuffers | None = None,
    ) -> LossTerms:
        """``weight_from``: the buffers whose ``w`` weights this step's losses and anchors (GSC+: the peer
        network's); ``c`` and ``p`` are always recorded into this hook's own buffers."""
        buffers = self._require_buffers()
        source = buffers if weight_from is None else weight_from
        weights = filter_weights(source.weights_for(sample_idx), self.weight_threshold).to(image_embeds.dtype)
        v, u = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
        bank = self._ensure_bank(v.shape[1])
        anchor_kwargs = {}
        if bank is not None and len(bank):
            bank_v, bank_u, _, bank_idx = bank.anchors()
            bank_w = _owner_weights(source, bank_idx, ctx.dist).to(bank_v.dtype)
            anchor_kwargs = dict(anchor_embeds=(bank_v, bank_u), anchor_weights=bank_w, anchor_sample_idx=bank_idx)
        scale = logit_scale if self.prob_logit_scale is None else self.prob_logit_scale
        terms = gsc_terms(v, u, weights, scale, sample_idx=sample_idx, structure=self.structure, pair_loss=ctx.loss,
                          **anchor_kwargs)
        structure_loss, p = terms.structure_loss, terms.positive_prob
        logs = {"gsc_weight_mean": weights.mean().detach(), "gsc_structure_loss": structure_loss.detach()}
        if torch.is_grad_enabled():  # training step: record this rank's scores, refresh the bank from all ranks
            with torch.no_grad():
                dist = ctx.dist
                buffers.record(sample_idx, terms.consistency, p)
                if bank is not None:
                    all_idx = dist.gather(sample_idx.to(v.device))
                    all_w = dist.gather(weights)
                    bank.update(dist.gather(v.detach()), dist.gather(u.detach()), all_w, all_idx,
                                priority=all_w * dist.gather(p))
        return LossTerms(weights=weights, extra_loss=self.gamma * structure_loss, logs=logs)

    def on_pass_end(self, pass_index: int, dist: Dist) -> dict[str, float]:
        buffers = self._require_buffers()
        stats = buffers.epoch_update(
            beta=self.beta, seed=self.seed + pass_index, prob_posterior=self.prob_posterior, prior_beta=self.prior_beta,
            **self.gmm,
        )
        if stats.num_seen == 0:
            return {}
        return {"gsc_mean_weight": stats.mean_weight, "gsc_clean_fraction": stats.clean_fraction,
                "gsc_num_updated": float(stats.num_seen)}

    def weights(self, network: int | None = None) -> torch.Tensor:
        """This rank's current ``w`` (local slots; ``network`` is GSC+'s)."""
        if network is not None:
            raise ValueError("gsc_weights(network=...) needs gsc_co_training=True (GSC+)")
        return self._require_buffers().weight

    def replicated_state_dict(self) -> dict[str, torch.Tensor]:
        """The pass-end counter and the anchor bank (the per-sample buffers live in ``storage``)."""
        state = {"buffers.num_updates": self._require_buffers().num_updates.clone()}
        if self.bank is not None:
            state.update({f"bank.{k}": v for k, v in self.bank.state_dict().items()})
        return state

    def load_replicated_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        buffers = self._require_buffers()
        if "buffers.num_updates" not in state:
            raise KeyError("GSC state is missing 'buffers.num_updates'")
        buffers.num_updates.copy_(state["buffers.num_updates"])
        bank_state = {k[len("bank."):]: v for k, v in state.items() if k.startswith("bank.")}
        if bank_state:
            bank = self._ensure_bank(int(bank_state["image_embeds"].shape[1]))
            if bank is None:
                raise ValueError("checkpoint holds a GSC anchor bank but this GSCHook has bank_size=0")
            bank.load_state_dict(bank_state)


def _owner_weights(buffers: GSCBuffers, sample_idx: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Current ``w`` of arbitrary samples (the replicated anchor bank's): each owner fills its own, then a sum
    over ranks."""
    own = buffers.storage.ownership
    idx = sample_idx.to(buffers.device)
    mine = own.owns(idx)
    w = torch.zeros(idx.shape, dtype=torch.float32, device=buffers.device)
    if bool(mine.any()):
        w[mine] = buffers.weight[own.local_slot(idx[mine], check=False)].float()
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(w)
    return w


class GSCPlusHook(BatchHook):
    """GSC+ weighting hook for a :class:`~hf_mmsel.models.CoTrainedDualEncoder` of ``num_networks`` networks.

    ``loss_terms`` must be called once per network with ``ctx.network = k`` (``ContrastiveTrainer`` does this
    with ``gsc_co_training=True``). Keyword arguments are :class:`GSCHook`'s, shared by every network.
    State keys: ``net{k}.`` + :meth:`GSCHook.state_dict` keys. Logs carry a ``_net{k}`` suffix.
    """

    state_kind = "gsc_plus"

    def __init__(self, num_networks: int = 2, **gsc_kwargs) -> None:
        if num_networks < 2:
            raise ValueError(f"GSC+ needs at least two networks, got {num_networks}")
        self.num_networks = num_networks
        self.networks = [GSCHook(**gsc_kwargs) for _ in range(num_networks)]
        self.diagnostics = self.networks[0].diagnostics  # GSCHook's defaults, defined once
        self.ema_bias_correction = self.networks[0].ema_bias_correction
        self.buffers: GSCPlusBuffers | None = None

    def setup(self, num_samples: int, device: torch.device, storage: StateNamespace | None = None) -> None:
        storage = self.use_storage(num_samples, device, storage)
        for k, hook in enumerate(self.networks):  # network k's arrays: "net{k}.buffers.*"
            hook.setup(num_samples, device, storage=storage.namespace(f"net{k}"))
        self.buffers = GSCPlusBuffers.of([hook.buffers for hook in self.networks])

    def _require_buffers(self) -> GSCPlusBuffers:
        if self.buffers is None:
            raise RuntimeError("GSCPlusHook.setup(num_samples, device) must run before training")
        return self.buffers

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx) -> LossTerms:
        buffers = self._require_buffers()
        k = ctx.network
        if k is None or not 0 <= k < self.num_networks:
            raise ValueError(
                f"GSCPlusHook.loss_terms needs ctx.network in [0, {self.num_networks}) (one call per co-trained "
                f"network, as ContrastiveTrainer does for a CoTrainedDualEncoder); got {k!r}"
            )
        peer = buffers.networks[buffers.peer_of(k)]
        terms = self.networks[k].loss_terms(image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss,
                                            ctx, weight_from=peer)
        terms.logs = {f"{name}_net{k}": value for name, value in terms.logs.items()}
        return terms

    def on_pass_end(self, pass_index: int, dist: Dist) -> dict[str, float]:
        logs: dict[str, float] = {}
        for k, hook in enumerate(self.networks):
            logs.update({f"{name}_net{k}": value for name, value in hook.on_pass_end(pass_index, dist).items()})
        return logs

    def weights(self, network: int | None = None) -> torch.Tensor:
        """Network ``network``'s own ``w``, or (``None``) the mean over networks: the ensemble's clean estimate."""
        buffers = self._require_buffers()
        if network is not None:
            return buffers.networks[network].weight
        return torch.stack([b.weight.float() for b in buffers.networks]).mean(0)

    def replicated_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"net{k}.{key}": v for k, hook in enumerate(self.networks)
                for key, v in hook.replicated_state_dict().items()}

    def load_replicated_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, hook in enumerate(self.networks):
            prefix = f"net{k}."
            sub = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
            if not sub:
                raise KeyError(f"GSC+ state has no entries for network {k} (expected keys starting {prefix!r})")
            hook.load_replicated_state_dict(sub)
        extra = sorted({key.split(".", 1)[0] for key in state} - {f"net{k}" for k in range(self.num_networks)})
        if extra:
            raise ValueError(f"GSC+ state holds {extra}, but this hook has {self.num_networks} networks")


def weight_diagnostics(weights: torch.Tensor, noisy: torch.Tensor | None) -> dict[str, float]:
    """Mean ``w``, and with ground-truth flags ``noisy`` (``[N]``: -1 unknown, 0 clean, 1 noisy) the mean ``w`` over
    known-clean and known-noisy pairs and the AUROC of ``w`` (clean = positive). Diagnostics only."""
    logs = {"gsc_epoch_weight_mean": float(weights.mean())}
    if noisy is None:
        return logs
    clean, bad = noisy == 0, noisy == 1
    if bool(clean.any()) and bool(bad.any()):
        from ..metrics.detection import auroc

        known = clean | bad
        logs.update(gsc_weight_mean_clean=float(weights[clean].mean()),
                    gsc_weight_mean_noisy=float(weights[bad].mean()),
                    gsc_weight_auroc=auroc(weights[known].numpy(), clean[known].numpy()))
    return logs
