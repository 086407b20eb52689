"""GSC noisy-correspondence detection (Zhao et al., CVPR 2024) for dual encoders, as plain torch.

- :mod:`.structure`: anchor-weighted intra-modal profiles, consistency ``c``, structure matching and loss, ``p``.
- :mod:`.anchors`: :class:`AnchorBank` of confident-clean anchor pairs.
- :mod:`.loss`: :func:`gsc_loss`, weighted bi-InfoNCE + γ·structure loss.
- :mod:`.gmm`: deterministic two-component 1-D GMM.
- :mod:`.buffers`: :class:`GSCBuffers` (per-sample state, epoch-end GMM/EMA update), :class:`GSCPlusBuffers`.
- :mod:`.scoring`: :func:`gsc_clean_probability`, one-pass clean probability of a whole dataset (curation).
- ``p`` under the step's loss: :meth:`hf_mmsel.losses.PairLoss.positive_prob` (:mod:`.sigmoid`: deprecated).

See docs/design.md (GSC) for the method and its adaptation to CLIP-style models.
"""

from __future__ import annotations

from .anchors import AnchorBank
from .buffers import EpochUpdateStats, GSCBuffers, GSCPlusBuffers
from .gmm import TwoGaussians, fit_two_gaussians, high_mean_posterior
from .loss import GSCLossOutput, gsc_loss, structure_terms, weighted_bidirectional_infonce
from .scoring import gsc_clean_probability
from .sigmoid import sigmoid_positive_probability
from .structure import (
    StructureConfig,
    StructureProfiles,
    positive_map,
    positive_probability,
    self_exclusion_mask,
    structure_consistency,
    structure_infonce,
    structure_matching,
    structure_profiles,
)

__all__ = [
    "AnchorBank",
    "EpochUpdateStats",
    "GSCBuffers",
    "GSCLossOutput",
    "GSCPlusBuffers",
    "StructureConfig",
    "StructureProfiles",
    "TwoGaussians",
    "fit_two_gaussians",
    "gsc_clean_probability",
    "gsc_loss",
    "high_mean_posterior",
    "positive_map",
    "positive_probability",
    "self_exclusion_mask",
    "sigmoid_positive_probability",
    "structure_consistency",
    "structure_infonce",
    "structure_matching",
    "structure_profiles",
    "structure_terms",
    "weighted_bidirectional_infonce",
]
