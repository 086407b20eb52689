"""``curation_score``: one default ranking that combines the per-pair scores that help, as a mean of quantiles.

Each component x_k (higher = cleaner) is mapped through its empirical CDF ``F_k`` on the pool (the seeded fit
sample for the embedding scores, every pair for the training-state scores), and

    curation_score(i) = (1 / |K|) Σ_{k∈K} F_k(x_k(i))    ∈ [0, 1]

so scores on different scales (a cosine, negCLIPLoss, GSC's ``w``) weigh the same and the result is a rank in the
pool ("0.7": cleaner than about 70 % of the pairs by the components on average). The CDFs are stored as
:data:`NUM_QUANTILES` quantiles, fitted once and applied shard by shard, so streamed scoring needs no second pass.
Which components, and why: docs/design.md, Curation §2.
"""

from __future__ import annotations

import torch

__all__ = ["COMPONENTS", "DEFAULT_COMPONENTS", "NUM_QUANTILES", "combine", "empirical_quantiles", "parse_components",
           "quantile_rank"]

#: the columns a curation score may combine (all "higher = cleaner"; ``gsc_weight`` exists only with a training
#: state and is dropped without one)
COMPONENTS = ("similarity", "neg_clip_loss", "consistency", "positive_prob", "gsc_weight")
DEFAULT_COMPONENTS = "neg_clip_loss"
NUM_QUANTILES = 1001


def parse_components(text: str) -> tuple[str, ...]:
    """``"neg_clip_loss+gsc_weight"`` -> ``("neg_clip_loss", "gsc_weight")``; a clear error on unknown names."""
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split("+") if p.strip()))
    unknown = [n for n in names if n not in COMPONENTS]
    if not names or unknown:
        raise ValueError(f"curation_score_components: {text!r} must be '+'-joined names from {list(COMPONENTS)}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    return names


def empirical_quantiles(values: torch.Tensor, num: int = NUM_QUANTILES) -> list[float]:
    """``num`` evenly spaced quantiles (0 .. 1) of the finite values (an empty list when there are none)."""
    x = values.detach().double().flatten().cpu()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return []
    return torch.quantile(x, torch.linspace(0, 1, num, dtype=torch.float64)).tolist()


def quantile_rank(values: torch.Tensor, quantiles: list[float]) -> torch.Tensor:
    """``F(x)`` in [0, 1] by linear interpolation between the stored quantiles (ties: the mean rank of the flat
    stretch; below the first quantile 0, above the last 1, by the clamped interpolation); NaN stays NaN. Float32, on
    ``values``' device."""
    x = values.detach().double().cpu()
    if not quantiles:
        return torch.full_like(x, float("nan")).float().to(values.device)
    q = torch.tensor(quantiles, dtype=torch.float64)
    levels = torch.linspace(0, 1, q.numel(), dtype=torch.float64)
    lo = torch.searchsorted(q, x, right=False)  # first quantile >= x
    hi = torch.searchsorted(q, x, right=True)  # first quantile > x
    # inside a stretch of equal quantiles the rank is its middle; between two quantiles interpolate linearly
    hi_c = hi.clamp(1, q.numel() - 1)
    left, right = q[hi_c - 1], q[hi_c]
    frac = ((x - left) / (right - left).clamp_min(1e-300)).clamp(0, 1)
    between = levels[hi_c - 1] + frac * (levels[hi_c] - levels[hi_c - 1])
    flat = 0.5 * (levels[lo.clamp(max=q.numel() - 1)] + levels[(hi - 1).clamp(min=0)])
    rank = torch.where(hi > lo, flat, between)
    rank = torch.where(torch.isnan(x), x, rank)
    return rank.float().to(values.device)


def combine(columns: dict[str, torch.Tensor], quantiles: dict[str, list[float]], components: tuple[str, ...]
            ) -> torch.Tensor:
    """The mean of ``F_k(x_k)`` over the ``components`` present in ``columns`` (see the module docstring)."""
    present = [k for k in components if k in columns]
    if not present:
        raise ValueError(f"none of the curation score components {list(components)} was computed")
    ranks = torch.stack([quantile_rank(columns[k].float(), quantiles[k]) for k in present])
    return ranks.mean(0)
