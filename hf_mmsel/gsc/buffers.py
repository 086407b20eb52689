"""Per-sample GSC state and the epoch-end label inference (gsc.md §2, §4, §12.2).

Length-N buffers, ones at start: weight ``w``, consistency ``c``, positive probability ``p``, ``ema_topo``,
``ema_pred``, the last clean posterior ``π``, plus a seen-this-epoch mask. During an epoch the trainer records the
(globally gathered) ``(sample_idx, c, p)`` of every step; at epoch end, over the samples seen this epoch only:

    ĉ = minmax(c);  π = posterior of the higher-mean component of a 2-component 1-D GMM fitted on ĉ
    ema_topo ← β·π + (1-β)·ema_topo;  ema_pred ← β·p + (1-β)·ema_pred;  w = min(ema_pred, ema_topo)

Rank consistency: the update is a deterministic pure function of the buffers (float64 torch EM with a
deterministic initialisation and a seeded subsample), so ranks holding identical gathered buffers compute
bit-identical weights with no communication. ``broadcast_fn`` optionally makes rank 0's result authoritative
anyway (e.g. ``lambda t: torch.distributed.broadcast(t, src=0)``), for heterogeneous hardware.
Degenerate scores (all equal) carry no structure evidence: ``π = 1`` for all (weights are then set by ``p``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .gmm import fit_two_gaussians, high_mean_posterior

BUFFER_NAMES = ("weight", "consistency", "positive_prob", "ema_topo", "ema_pred", "clean_posterior")


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


def _clean_posterior(
    scores: torch.Tensor, *, max_iter: int, tol: float, reg_covar: float, max_fit_samples: int, seed: int,
    monotone: bool
) -> tuple[torch.Tensor, int, tuple[float, float] | None, bool | None]:
    """gsc.md §4 steps 1-2: min-max normalise, fit a 2-component GMM (on a seeded subsample of at most
    ``max_fit_samples``), return the posterior of the higher-mean component for every score, the number of
    fitted scores, the component means and convergence. All-equal scores carry no evidence: posterior 1,
    means ``None``."""
    lo, hi = scores.min(), scores.max()
    if not bool(hi - lo > 1e-12):
        return torch.ones_like(scores), 0, None, None
    normalised = (scores - lo) / (hi - lo)
    fit_values = normalised
    if normalised.numel() > max_fit_samples:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(normalised.numel(), generator=gen)[:max_fit_samples].to(normalised.device)
        fit_values = normalised[pick]
    if not bool(fit_values.max() > fit_values.min()):  # a subsample holding a single value
        return torch.ones_like(scores), fit_values.numel(), None, None
    gmm = fit_two_gaussians(fit_values.cpu(), max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    posterior = high_mean_posterior(normalised, gmm, monotone=monotone)
    return posterior, fit_values.numel(), (float(gmm.means[0]), float(gmm.means[1])), gmm.converged


class GSCBuffers:
    """GSC per-sample state for ``num_samples`` pairs indexed by a stable ``sample_idx`` in ``[0, N)``."""

    def __init__(self, num_samples: int, device: torch.device | str | None = None) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        for name in BUFFER_NAMES:
            setattr(self, name, torch.ones(num_samples, device=device))
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.num_updates = torch.zeros((), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def weights_for(self, sample_idx: torch.Tensor) -> torch.Tensor:
        """Current weights ``w`` of the given samples (on the index's device)."""
        self._check_index(sample_idx)
        return self.weight[sample_idx.to(self.device)].to(sample_idx.device)

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
        """Store this step's (globally gathered) ``c`` and ``p`` and mark the samples seen. A sample repeated
        in one call keeps its last value, deterministically."""
        sample_idx = sample_idx.flatten()
        if consistency.numel() != sample_idx.numel() or positive_prob.numel() != sample_idx.numel():
            raise ValueError(
                f"record got {sample_idx.numel()} indices, {consistency.numel()} consistency scores and "
                f"{positive_prob.numel()} probabilities"
            )
        self._check_index(sample_idx)
        idx, last = _last_occurrence(sample_idx.to(self.device))
        last = last.to(consistency.device)
        self.consistency[idx] = consistency.detach().flatten()[last].to(self.consistency)
        self.positive_prob[idx] = positive_prob.detach().flatten()[last.to(positive_prob.device)].to(
            self.positive_prob
        )
        self.seen[idx] = True

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
        broadcast_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> EpochUpdateStats:
        """End-of-epoch label inference (gsc.md §4) over the samples seen this epoch; resets the seen mask.

        The GMM is fitted on at most ``max_fit_samples`` scores (a subsample drawn with ``seed``) and predicts
        for all seen samples. ``prob_posterior`` (a deviation, gsc.md §12.1) feeds ``ema_pred`` with the GMM
        clean posterior of ``p`` instead of raw ``p``: raw ``p`` is small even for clean pairs when the batch is
        large, the scale high or captions repeat within a batch, which drags ``w = min(...)`` down for everyone.
        Returns summary statistics."""
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        seen = self.seen.nonzero().flatten()
        if seen.numel() == 0:
            return EpochUpdateStats(0, 0, True, None, None, float("nan"), float("nan"))
        c = self.consistency[seen].to(torch.float64)
        p = self.positive_prob[seen]
        bad = (~torch.isfinite(c)).sum() + (~torch.isfinite(p)).sum()
        if int(bad):
            raise ValueError(f"GSC buffers hold {int(bad)} non-finite consistency/probability values this epoch")

        fit = dict(max_iter=max_iter, tol=tol, reg_covar=reg_covar, max_fit_samples=max_fit_samples, seed=seed,
                   monotone=monotone_posterior)
        posterior, num_fit, means, converged = _clean_posterior(c, **fit)
        degenerate = means is None
        if prob_posterior:
            p = _clean_posterior(p.to(torch.float64), **fit)[0].to(p.dtype)
        posterior = posterior.to(self.clean_posterior.dtype)
        ema_topo = beta * posterior + (1 - beta) * self.ema_topo[seen]
        ema_pred = beta * p + (1 - beta) * self.ema_pred[seen]
        weight = torch.minimum(ema_pred, ema_topo)
        packed = torch.stack([posterior, ema_topo, ema_pred, weight])
        if broadcast_fn is not None:
            result = broadcast_fn(packed)
            packed = packed if result is None else result
        self.clean_posterior[seen], self.ema_topo[seen], self.ema_pred[seen], self.weight[seen] = packed
        self.seen.zero_()
        self.num_updates += 1
        return EpochUpdateStats(
            num_seen=seen.numel(),
            num_fit=num_fit,
            degenerate=degenerate,
            gmm_means=means,
            gmm_converged=converged,
            clean_fraction=float((packed[0] > 0.5).float().mean()),
            mean_weight=float(packed[3].mean()),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All buffers (tensors only; safetensors-compatible)."""
        state = {name: getattr(self, name).clone() for name in BUFFER_NAMES}
        state["seen"] = self.seen.clone()
        state["num_updates"] = self.num_updates.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted((set(BUFFER_NAMES) | {"seen", "num_updates"}) - set(state))
        if missing:
            raise KeyError(f"GSC buffer state is missing {missing}")
        for name in (*BUFFER_NAMES, "seen"):
            if state[name].shape != (self.num_samples,):
                raise ValueError(
                    f"GSC buffer {name!r} was saved for {state[name].numel()} samples, but this dataset has "
                    f"{self.num_samples}"
                )
        for name in (*BUFFER_NAMES, "seen", "num_updates"):
            getattr(self, name).copy_(state[name])


class GSCPlusBuffers:
    """GSC+ (gsc.md §6): one :class:`GSCBuffers` per network; network k is trained with its peer's weights
    (for two networks, the other one; in general network ``(k + 1) % n``) and updates its own buffers."""

    def __init__(self, num_samples: int, num_networks: int = 2, device: torch.device | str | None = None) -> None:
        if num_networks < 2:
            raise ValueError(f"GSC+ needs at least two networks, got {num_networks}")
        self.networks = [GSCBuffers(num_samples, device=device) for _ in range(num_networks)]

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
