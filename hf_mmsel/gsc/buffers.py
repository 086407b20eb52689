"""Per-sample GSC state and the epoch-end label inference (docs/design.md, GSC §2, §4, §12.2).

Per-sample arrays, float16 (10 B/sample, in the sharded :class:`~hf_mmsel.state.PerSampleState`): weight ``w``,
consistency ``c`` (NaN = not seen this pass), positive probability ``p``, ``ema_topo``, ``ema_pred``; with the
optional bias-corrected EMA a uint8 count ``n`` of the pass ends that updated the sample (1 B/sample more); the
last clean posterior ``π`` only with ``keep_posterior`` (diagnostics). During a pass each rank records its own
``(sample_idx, c, p)`` (it owns its candidates); at the pass end, over the samples seen this pass only:

    ĉ = minmax(c);  π = posterior of the higher-mean component of a 2-component 1-D GMM fitted on ĉ
    E ← β·x + (1-β)·E   for (E, x) = (ema_topo, π) and (ema_pred, p);   w = min(ema_pred, ema_topo)

GSC's code starts both EMAs at 1 ("all clean"), so one β sets both how fast that prior is forgotten, (1-β)^n,
and how long the pair's past evidence is remembered. With ``bias_correction`` (optional; docs/curation.md,
"Deviations from the paper") the two are separate: the EMAs are Adam's bias-corrected ones of the evidence alone,
``E_n = Σ_s β(1-β)^(n-s) x_s / (1 - (1-β)^n)`` (updated in place from the stored ``E`` and ``n``:
``E ← (β·x + (1-β)·d_(n-1)·E) / d_n``, ``d_n = 1 - (1-β)^n``), and the prior enters ``w`` alone, with its own
rate β₀: ``w = (1-β₀)^n + (1 - (1-β₀)^n)·min(E_pred, E_topo)``. β₀ = β is GSC's EMA exactly; a small β with a
large β₀ is a long memory with GSC's fast start.

Identical to the single-process result by construction (docs/design.md, Scale §B): global min/max of ``c``
(all_reduce), a subsample chosen by a hash of ``(seed, sample_idx)`` (the ``max_fit_samples`` smallest hashes
over all ranks, not ``randperm``), gathered with padding, **sorted by sample_idx** before the float64 EM, which
every rank runs on the same values in the same order; the posterior is then applied locally.
``broadcast_fn`` optionally overwrites the packed result with rank 0's (single-process compatibility hook).
Degenerate scores (all equal) carry no structure evidence: ``π = 1`` for all (weights are then set by ``p``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..state import PerSampleState, SampleOwnership, StateNamespace, all_gather_uneven
from .gmm import fit_two_gaussians, high_mean_posterior

BUFFER_NAMES = ("weight", "consistency", "positive_prob", "ema_topo", "ema_pred")
STATE_DTYPE = torch.float16
COUNT_NAME = "num_estimates"  # uint8 pass-end count n of the bias-corrected EMA (saturates at 255)


@dataclass
class EpochUpdateStats:
    """Summary of one :meth:`GSCBuffers.epoch_update`."""

    num_seen: int
    num_fit: int
    degenerate: bool
    gmm_means: tuple[float, float] | None
    gmm_converged: bool | None
    clean_fraction: float  # share of seen samples with π > 0.5
    mean_weight: float  # mean w over seen samples


def _last_occurrence(sample_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique indices and, for each, the position of its last occurrence (deterministic duplicate handling)."""
    unique, inverse = torch.unique(sample_idx, return_inverse=True)
    positions = torch.arange(sample_idx.numel(), device=sample_idx.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=sample_idx.device)
    last.scatter_reduce_(0, inverse, positions, reduce="amax")
    return unique, last


def sample_hash(seed: int, sample_idx: torch.Tensor) -> torch.Tensor:
    """A uniform float64 in [0, 1) per ``sample_idx``, a pure function of ``(seed, sample_idx)`` (splitmix-style
    int64 mixing), so the GMM subsample does not depend on the world size or the data order."""
    mask31, mask53 = (1 << 31) - 1, (1 << 53) - 1
    x = sample_idx.to(torch.int64) * 6364136223846793005 + (int(seed) * 1442695040888963407) % (1 << 62)
    x = x ^ ((x >> 33) & mask31)
    x = x * -49064778989728563
    x = x ^ ((x >> 33) & mask31)
    x = x * -4265267296055464877
    x = x ^ ((x >> 33) & mask31)
    return ((x >> 11) & mask53).to(torch.float64) / float(1 << 53)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if _world() > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t


def gmm_clean_posterior(
    scores: torch.Tensor, sample_idx: torch.Tensor | None = None, *, max_iter: int, tol: float, reg_covar: float,
    max_fit_samples: int, seed: int, monotone: bool, distributed: bool = False
) -> tuple[torch.Tensor, int, tuple[float, float] | None, bool | None]:
    """docs/design.md, GSC §4 steps 1-2 over the scores of every rank (each passes its own ``scores``/``sample_idx``):
    global min-max normalisation, a 2-component GMM fitted on the ``max_fit_samples`` samples of smallest
    :func:`sample_hash` (sorted by sample_idx), the posterior of the higher-mean component for this rank's scores, the
    number of fitted scores, the component means and convergence. All-equal scores carry no evidence: posterior 1, means
    ``None``. ``distributed=False``: ``scores`` are the whole pool (no collectives); ``sample_idx`` defaults to
    positions."""
    scores = scores.to(torch.float64)
    if sample_idx is None:
        sample_idx = torch.arange(scores.numel(), device=scores.device)
    reduce = _all_reduce if distributed else (lambda t, op: t)
    gather = all_gather_uneven if distributed else (lambda t: [t])
    big = torch.finfo(torch.float64).max
    lo = reduce(torch.tensor([scores.min().item() if scores.numel() else big], dtype=torch.float64,
                                  device=scores.device), "min")
    hi = reduce(torch.tensor([scores.max().item() if scores.numel() else -big], dtype=torch.float64,
                                  device=scores.device), "max")
    if not bool(hi - lo > 1e-12):
        return torch.ones_like(scores), 0, None, None
    normalised = (scores - lo) / (hi - lo)
    keys = sample_hash(seed, sample_idx)
    if keys.numel() > max_fit_samples:  # this rank's candidates for the global max_fit_samples smallest hashes
        local = torch.topk(keys, max_fit_samples, largest=False).indices
    else:
        local = torch.arange(keys.numel(), device=keys.device)
    fit = torch.stack([sample_idx[local].to(torch.float64), keys[local], normalised[local]], dim=1)
    fit = torch.cat(gather(fit.contiguous()), dim=0)
    if fit.shape[0] > max_fit_samples:
        fit = fit[torch.sort(fit[:, 1], stable=True).indices[:max_fit_samples]]
    fit = fit[torch.sort(fit[:, 0], stable=True).indices]  # one summation order for the EM on every rank
    fit_values = fit[:, 2]
    if not bool(fit_values.max() > fit_values.min()):  # a subsample holding a single value
        return torch.ones_like(scores), fit_values.numel(), None, None
    gmm = fit_two_gaussians(fit_values.cpu(), max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    posterior = high_mean_posterior(normalised, gmm, monotone=monotone)
    return posterior, fit_values.numel(), (float(gmm.means[0]), float(gmm.means[1])), gmm.converged


class GSCBuffers:
    """GSC per-sample state for ``num_samples`` pairs indexed by a stable ``sample_idx`` in ``[0, N)``; with
    ``storage`` (a namespace of the sharded per-sample state) only the owned samples, indexed globally."""

    def __init__(self, num_samples: int | None = None, device: torch.device | str | None = None, *,
                 storage: StateNamespace | None = None, keep_posterior: bool = True,
                 bias_correction: bool = True) -> None:
        if storage is None:
            if num_samples is None or num_samples <= 0:
                raise ValueError(f"num_samples must be positive, got {num_samples}")
            storage = PerSampleState(SampleOwnership.single(num_samples), device or "cpu").namespace("buffers")
        self.storage = storage
        self.num_samples = storage.ownership.num_samples
        for name in BUFFER_NAMES:
            setattr(self, name, storage.add(name, STATE_DTYPE, float("nan") if name == "consistency" else 1.0))
        self.clean_posterior = storage.add("clean_posterior", STATE_DTYPE, 1.0) if keep_posterior else None
        self.num_estimates = storage.add(COUNT_NAME, torch.uint8, 0) if bias_correction else None
        self.num_updates = torch.zeros((), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def seen(self) -> torch.Tensor:
        """Bool mask of the (local) samples recorded this pass."""
        return ~torch.isnan(self.consistency)

    def weights_for(self, sample_idx: torch.Tensor) -> torch.Tensor:
        """Current weights ``w`` (float32) of the given owned samples (on the index's device)."""
        self._check_index(sample_idx)
        return self.weight[self.storage.slots(sample_idx)].float().to(sample_idx.device)

    def _check_index(self, sample_idx: torch.Tensor) -> None:
        if sample_idx.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"sample_idx must be an integer tensor, got {sample_idx.dtype}")
        if sample_idx.numel() and (int(sample_idx.min()) < 0 or int(sample_idx.max()) >= self.num_samples):
            raise IndexError(
                f"sample_idx out of range [0, {self.num_samples}): min {int(sample_idx.min())}, "
                f"max {int(sample_idx.max())}; the buffers were sized for a different dataset"
            )

    @torch.no_grad()
    def record(self, sample_idx: torch.Tensor, consistency: torch.Tensor, positive_prob: torch.Tensor) -> None:
        """Store this step's ``c`` and ``p`` of owned samples and mark them seen. A sample repeated in one call
        keeps its last value, deterministically. Non-finite values raise (NaN marks "not seen")."""
        sample_idx = sample_idx.flatten()
        if consistency.numel() != sample_idx.numel() or positive_prob.numel() != sample_idx.numel():
            raise ValueError(
                f"record got {sample_idx.numel()} indices, {consistency.numel()} consistency scores and "
                f"{positive_prob.numel()} probabilities"
            )
        self._check_index(sample_idx)
        c, p = consistency.detach().flatten(), positive_prob.detach().flatten()
        if not bool(torch.isfinite(c).all() & torch.isfinite(p).all()):
            raise ValueError("GSC got non-finite consistency/probability values for this step")
        idx, last = _last_occurrence(sample_idx.to(self.device))
        slots = self.storage.slots(idx)
        self.consistency[slots] = c[last.to(c.device)].to(self.device, STATE_DTYPE)
        self.positive_prob[slots] = p[last.to(p.device)].to(self.device, STATE_DTYPE)

    @torch.no_grad()
    def epoch_update(
        self,
        beta: float = 0.7,
        max_iter: int = 10,
        tol: float = 1e-2,
        reg_covar: float = 5e-4,
        max_fit_samples: int = 200_000,
        seed: int = 0,
        monotone_posterior: bool = True,
        prob_posterior: bool = False,
        prior_beta: float = 1.0,
        broadcast_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> EpochUpdateStats:
        """Pass-end label inference (docs/design.md, GSC §4) over the samples seen this pass on every rank (call on
        every rank); resets the seen marks. The GMM is fitted on at most ``max_fit_samples`` scores (chosen by
        :func:`sample_hash` with ``seed``) and predicts for all seen samples. ``prob_posterior`` (a deviation,
        docs/design.md, GSC §12.1) feeds ``ema_pred`` with the GMM clean posterior of ``p`` instead of raw ``p``: raw
        ``p`` is small even for clean pairs when the batch is large, the scale high or captions repeat within a batch,
        which drags ``w = min(...)`` down for everyone. ``prior_beta`` (bias-corrected buffers only): ``w`` keeps the
        prior 1 with weight ``(1 - prior_beta)^n``, ``w = (1-β₀)^n + (1 - (1-β₀)^n)·min(E_pred, E_topo)`` (1.0: no
        prior). Returns global summary statistics."""
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not 0.0 < prior_beta <= 1.0:
            raise ValueError(f"prior_beta must be in (0, 1], got {prior_beta}")
        seen = self.seen.nonzero().flatten()
        num_seen = int(_all_reduce(torch.tensor([seen.numel()], dtype=torch.long, device=self.device), "sum"))
        if num_seen == 0:
            return EpochUpdateStats(0, 0, True, None, None, float("nan"), float("nan"))
        c = self.consistency[seen].to(torch.float64)
        p = self.positive_prob[seen].float()
        global_idx = self.storage.ownership.global_of_slots(seen)
        fit = dict(max_iter=max_iter, tol=tol, reg_covar=reg_covar, max_fit_samples=max_fit_samples, seed=seed,
                   monotone=monotone_posterior, distributed=True)
        posterior, num_fit, means, converged = gmm_clean_posterior(c, global_idx, **fit)
        degenerate = means is None
        if prob_posterior:
            p = gmm_clean_posterior(p.to(torch.float64), global_idx, **fit)[0].float()
        posterior = posterior.float()
        # estimates so far per seen pair (this pass's not counted); None: GSC's EMA started at 1
        n = self.num_estimates[seen].double() if self.num_estimates is not None else None
        ema_topo = self._ema(self.ema_topo[seen], posterior, beta, n)
        ema_pred = self._ema(self.ema_pred[seen], p, beta, n)
        weight = torch.minimum(ema_pred, ema_topo)
        if n is not None and prior_beta < 1.0:  # the prior 1, weighted (1 - β₀)^n after this pass's estimate
            prior = ((1.0 - prior_beta) ** (n + 1).clamp_max(255.0)).float()
            weight = prior + (1.0 - prior) * weight
        packed = torch.stack([posterior, ema_topo, ema_pred, weight])
        if broadcast_fn is not None:
            result = broadcast_fn(packed)
            packed = packed if result is None else result
        packed = packed.to(STATE_DTYPE)
        if self.clean_posterior is not None:
            self.clean_posterior[seen] = packed[0]
        self.ema_topo[seen], self.ema_pred[seen], self.weight[seen] = packed[1], packed[2], packed[3]
        if self.num_estimates is not None:
            self.num_estimates[seen] = (self.num_estimates[seen].int() + 1).clamp_max(255).to(torch.uint8)
        self.consistency.fill_(float("nan"))
        self.num_updates += 1
        sums = _all_reduce(torch.stack([(packed[0] > 0.5).double().sum(), packed[3].double().sum()]), "sum")
        return EpochUpdateStats(
            num_seen=num_seen,
            num_fit=num_fit,
            degenerate=degenerate,
            gmm_means=means,
            gmm_converged=converged,
            clean_fraction=float(sums[0]) / num_seen,
            mean_weight=float(sums[1]) / num_seen,
        )

    @staticmethod
    def _ema(previous: torch.Tensor, value: torch.Tensor, beta: float, n: torch.Tensor | None) -> torch.Tensor:
        """One EMA step: GSC's ``β·x + (1-β)·E`` (prior 1) when ``n`` is None, else the bias-corrected step after
        ``n`` earlier estimates."""
        previous = previous.float()
        if n is None:
            return beta * value + (1 - beta) * previous
        d_prev = 1.0 - (1.0 - beta) ** n  # 0 before the first estimate: the prior drops out
        d = 1.0 - (1.0 - beta) ** torch.clamp(n + 1, max=255.0)
        return ((beta * value.double() + (1 - beta) * d_prev * previous.double()) / d).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All buffers (tensors only; safetensors-compatible): the per-sample arrays of ``storage`` by name, plus
        the pass-end counter ``num_updates``."""
        return {**self.storage.state_dict(), "num_updates": self.num_updates.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted((set(BUFFER_NAMES) | {"num_updates"}) - set(state))
        if missing:
            raise KeyError(f"GSC buffer state is missing {missing}")
        if (COUNT_NAME in state) != (self.num_estimates is not None):
            raise ValueError(
                f"GSC buffer state was saved with{'' if COUNT_NAME in state else 'out'} the bias-corrected EMA "
                f"(its {COUNT_NAME!r} count); set gsc_ema_bias_correction={COUNT_NAME in state} to resume it"
            )
        for name, t in self.storage.arrays().items():
            if name in state and state[name].shape != t.shape:
                raise ValueError(f"GSC buffer {name!r} was saved for {state[name].numel()} samples, but this dataset "
                                 f"has {t.numel()}")
        self.storage.load_state_dict(state)
        self.num_updates.copy_(state["num_updates"])


class GSCPlusBuffers:
    """GSC+ (docs/design.md, GSC §6): one :class:`GSCBuffers` per network; network k is trained with its peer's weights
    (for two networks, the other one; in general network ``(k + 1) % n``) and updates its own buffers."""

    def __init__(self, num_samples: int | None = None, num_networks: int = 2, device: torch.device | str | None = None,
                 *, storage: StateNamespace | None = None, keep_posterior: bool = True,
                 bias_correction: bool = True) -> None:
        if num_networks < 2:
            raise ValueError(f"GSC+ needs at least two networks, got {num_networks}")
        if storage is None:
            if num_samples is None or num_samples <= 0:
                raise ValueError(f"num_samples must be positive, got {num_samples}")
            storage = PerSampleState(SampleOwnership.single(num_samples), device or "cpu").namespace("plus")
        self.networks = [GSCBuffers(storage=storage.namespace(f"net{k}.buffers"), keep_posterior=keep_posterior,
                                    bias_correction=bias_correction) for k in range(num_networks)]

    @classmethod
    def of(cls, networks: list[GSCBuffers]) -> "GSCPlusBuffers":
        """GSC+ buffers over existing per-network :class:`GSCBuffers` (one per co-trained network)."""
        if len(networks) < 2:
            raise ValueError(f"GSC+ needs at least two networks, got {len(networks)}")
        plus = cls.__new__(cls)
        plus.networks = list(networks)
        return plus

    def peer_of(self, network: int) -> int:
        return (network + 1) % len(self.networks)

    def loss_weights(self, network: int, sample_idx: torch.Tensor) -> torch.Tensor:
        """Weights network ``network`` trains with: its peer's ``w``."""
        return self.networks[self.peer_of(network)].weights_for(sample_idx)

    def record(self, network: int, sample_idx: torch.Tensor, consistency: torch.Tensor, positive_prob: torch.Tensor) -> None:
        self.networks[network].record(sample_idx, consistency, positive_prob)

    def epoch_update(self, **kwargs) -> list[EpochUpdateStats]:
        """Each network's own label inference (same keyword arguments as :meth:`GSCBuffers.epoch_update`)."""
        return [buffers.epoch_update(**kwargs) for buffers in self.networks]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"net{k}.{name}": t for k, b in enumerate(self.networks) for name, t in b.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, buffers in enumerate(self.networks):
            prefix = f"net{k}."
            sub = {key[len(prefix) :]: t for key, t in state.items() if key.startswith(prefix)}
            if not sub:
                raise KeyError(f"GSC+ state has no entries for network {k} (expected keys starting {prefix!r})")
            buffers.load_state_dict(sub)
