"""``hardest_clean`` (alias ``recommended``): the hardest pairs among those a per-batch mixture calls clean.

Per candidate batch of one rank, with the current model's CLIPScore ``s_i = 100·cos(v_i, u_i)``:

1. min-max normalise ``s`` over the batch and fit a 2-component 1-D Gaussian mixture (EM, :mod:`hf_mmsel.gsc.gmm`);
   ``π_i`` = posterior of the higher-mean ("clean") component, clipped to be monotone in ``s``;
2. the clean pool is ``C = {i : π_i > 1/2}``; keep the ``k`` pairs of ``C`` with the *lowest* ``s`` (clean but not
   yet learnt); when ``|C| < k`` keep all of ``C`` and fill up with the highest-``s`` pairs outside it.

It combines the two halves of what works in the noisy-label literature: a mixture split of per-sample scores into
clean and noisy (DivideMix's GMM on losses, GSC's GMM on its consistency scores) and RHO-LOSS's preference for
points that are learnable but not yet learnt. ``clipscore`` keeps the *easiest* pairs, so with ``r`` below the clean
share it spends its budget on pairs the model already fits; ``hardest_clean`` spends it on the clean pairs closest
to the decision boundary. The mixture needs no noise-rate guess and no state; a batch whose scores are all equal
falls back to ``clipscore``'s order. Works with fresh or ``last_visit`` scores (it reads only ``s``), with GSC
weighting of the kept pairs and with in-sampler selection. docs/results.md gives the measurements and the
variants that did not help.
"""

from __future__ import annotations

import torch

from ..gsc.gmm import fit_two_gaussians, high_mean_posterior
from .strategies import SELECTION_STRATEGIES, Candidates, SelectionStrategy

__all__ = ["HardestClean", "RECOMMENDED", "clean_pool_posterior", "hardest_clean_criterion"]

#: The strategy the docs and benchmarks point at: ``selection_strategy="recommended"``.
RECOMMENDED = "hardest_clean"


def clean_pool_posterior(scores: torch.Tensor, max_iter: int = 10, tol: float = 1e-2,
                         reg_covar: float = 5e-4) -> torch.Tensor | None:
    """``π``: the posterior of the higher-mean component of a 2-component GMM fitted on the min-max normalised
    ``scores`` (float32, same device), or ``None`` when all scores are equal (no evidence)."""
    x = scores.detach().to(torch.float64).cpu()
    lo, hi = x.min(), x.max()
    if not bool(hi - lo > 1e-12):
        return None
    x = (x - lo) / (hi - lo)
    if torch.unique(x).numel() < 2:
        return None
    gmm = fit_two_gaussians(x, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    return high_mean_posterior(x, gmm, monotone=True).to(scores.device, torch.float32)


def hardest_clean_criterion(scores: torch.Tensor) -> torch.Tensor:
    """A keep criterion (larger = keep) whose top-k is the hardest-clean rule of the module docstring: every pool
    member ranks above every non-member; inside the pool lower ``s`` ranks higher, outside it higher ``s``."""
    s = scores.detach().float()
    posterior = clean_pool_posterior(s)
    if posterior is None:
        return s
    span = float(s.max() - s.min()) + 1.0
    return torch.where(posterior > 0.5, 2.0 * span - (s - s.min()), s - s.min() - span)


class HardestClean(SelectionStrategy):
    """Keep the k lowest-score pairs of the batch's GMM clean pool (module docstring); needs the learner's
    CLIPScore (a scoring forward with fresh scores, none with ``last_visit``)."""

    name = "hardest_clean"
    requires = "clip_score"

    def criterion(self, cand: Candidates, bank) -> torch.Tensor:
        return hardest_clean_criterion(100.0 * cand.cosine)


SELECTION_STRATEGIES[HardestClean.name] = HardestClean
SELECTION_STRATEGIES["recommended"] = HardestClean
