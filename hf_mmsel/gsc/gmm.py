"""A deterministic two-component 1-D Gaussian mixture (docs/design.md, GSC §4 step 2), in float64 torch.

Equivalent in intent to sklearn's ``GaussianMixture(n_components=2, max_iter, tol, reg_covar)`` as GSC uses it,
but initialised deterministically (1-D k-means started at the min and max), so that every process fitting the
same scores gets bit-identical parameters without any communication. ``tol`` bounds the change of the mean
log-likelihood between iterations, as in sklearn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TwoGaussians:
    """Mixture parameters; component 1 has the higher mean after :func:`fit_two_gaussians`."""

    means: torch.Tensor  # (2,)
    variances: torch.Tensor  # (2,)
    mixing: torch.Tensor  # (2,)
    n_iter: int
    converged: bool


def _log_joint(x: torch.Tensor, g: TwoGaussians) -> torch.Tensor:
    """(N, 2) ``log π_k + log N(x | μ_k, σ²_k)``."""
    x = x.reshape(-1, 1)
    return (
        torch.log(g.mixing)
        - 0.5 * (math.log(2 * math.pi) + torch.log(g.variances))
        - 0.5 * (x - g.means) ** 2 / g.variances
    )


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float) -> tuple[torch.Tensor, ...]:
    nk = resp.sum(dim=0) + 10 * torch.finfo(x.dtype).eps
    means = (resp * x.reshape(-1, 1)).sum(dim=0) / nk
    variances = (resp * (x.reshape(-1, 1) - means) ** 2).sum(dim=0) / nk + reg_covar
    return means, variances, nk / x.numel()


def fit_two_gaussians(
    x: torch.Tensor, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4, kmeans_iter: int = 20
) -> TwoGaussians:
    """Fit a 2-component GMM to 1-D ``x`` (at least 2 distinct values) by EM; components sorted by mean."""
    x = x.detach().to(torch.float64).flatten()
    lo, hi = x.min(), x.max()
    if x.numel() < 2 or not bool(hi > lo):
        raise ValueError("fit_two_gaussians needs at least two distinct values")
    centres = torch.stack([lo, hi])
    for _ in range(kmeans_iter):  # 1-D Lloyd: both clusters stay non-empty (min and max never switch)
        high = (x - centres[0]).abs() > (x - centres[1]).abs()
        new = torch.stack([x[~high].mean(), x[high].mean()])
        if torch.equal(new, centres):
            break
        centres = new
    resp = torch.stack([(~high).to(x.dtype), high.to(x.dtype)], dim=1)
    means, variances, mixing = _m_step(x, resp, reg_covar)
    g = TwoGaussians(means, variances, mixing, n_iter=0, converged=False)
    previous = -math.inf
    for it in range(1, max_iter + 1):
        log_joint = _log_joint(x, g)
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        current = float(log_norm.mean())
        resp = torch.exp(log_joint - log_norm)
        g = TwoGaussians(*_m_step(x, resp, reg_covar), n_iter=it, converged=False)
        if abs(current - previous) < tol:
            g.converged = True
            break
        previous = current
    order = torch.argsort(g.means)
    return TwoGaussians(g.means[order], g.variances[order], g.mixing[order], g.n_iter, g.converged)


def high_mean_posterior(x: torch.Tensor, g: TwoGaussians, monotone: bool = True) -> torch.Tensor:
    """Posterior probability of the higher-mean component (index 1) for every value of ``x`` (float64).

    With ``monotone`` (a deviation from plain GSC), ``x`` is first clipped to ``[μ_low, μ_high]``: a score beyond
    the clean mean can then never look noisier than the clean mean itself (an unequal-variance GMM otherwise
    hands the far tail back to the wider component)."""
    dev = x.device
    g_dev = TwoGaussians(g.means.to(dev), g.variances.to(dev), g.mixing.to(dev), g.n_iter, g.converged)
    x = x.to(torch.float64)
    if monotone:
        x = torch.minimum(torch.maximum(x, g_dev.means[0]), g_dev.means[1])
    return torch.softmax(_log_joint(x, g_dev), dim=1)[:, 1]
