"""Per-shard GSC scores against a fixed anchor set, and a clean/noisy mixture fitted once and applied anywhere.

Streamed counterpart of :func:`hf_mmsel.gsc.scoring.gsc_clean_probability` (same math, reused from
:mod:`hf_mmsel.gsc`), reorganised so that no step needs the whole pool:

1. ``p_i``: positive-pair probability inside chunks of ``chunk_size`` pairs drawn by a permutation of the
   *shard* seeded with ``(seed, shard offset)``; one batched softmax per shard (no per-chunk host sync);
2. ``c_i``: structure consistency against ONE fixed set of M anchor pairs (sample ids drawn once with ``seed``
   over ``[0, N)``, embedded once, saved with the outputs); the sigmoid centres ``mu`` are the mean cosine
   between distinct anchors, a property of the anchor set, so every shard is scored in the same frame;
3. a 2-component GMM per score (``c``, and ``log p`` when ``prob_posterior``) fitted ONCE on a seeded subsample
   of the pool's raw scores, stored as plain numbers (:class:`CleanMixture`) and applied shard by shard:
   ``clean_prob = min(π(c), P)``.

Everything is a deterministic function of the shard's embeddings, the anchor set, the mixture and ``seed``:
the shard, not the process or engine that scores it, fixes the result. Memory: O(shard + anchors + fit sample).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_mmsel.gsc.gmm import TwoGaussians, fit_two_gaussians, high_mean_posterior
from hf_mmsel.gsc.scoring import DEFAULT_STRUCTURE, anchor_consistency, mean_anchor_cosine
from hf_mmsel.gsc.structure import StructureConfig

from .contrast_batches import chunk_logits, seeded_chunks
from .curation_score import combine, empirical_quantiles
from .neg_clip_loss import neg_clip_loss

#: Ashman's D below which a 2-component fit shows no distinct noisy mode (its weight is no noise estimate)
MIN_SEPARATION = 2.0
RAW_SCORE_COLUMNS = ("similarity", "neg_clip_loss", "positive_prob", "consistency")


def shard_seed(seed: int, offset: int) -> int:
    """The chunk-permutation seed of the shard starting at ``offset`` (independent of who scores it)."""
    return int(np.random.SeedSequence([int(seed), int(offset)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def batched_positive_probability(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float, *, chunk_size: int, seed: int
) -> torch.Tensor:
    """:func:`hf_mmsel.gsc.scoring.chunked_positive_probability` (same seeded chunks, same values) computed as
    one padded batched matmul + masked softmax instead of a Python loop over chunks. Float32 [n]."""
    n = image_embeds.shape[0]
    index, valid = seeded_chunks(n, chunk_size, seed, image_embeds.device)
    i2t_logits, t2i_logits = chunk_logits(image_embeds, text_embeds, logit_scale, index, valid)
    i2t = i2t_logits.softmax(dim=2).diagonal(dim1=1, dim2=2)
    t2i = t2i_logits.softmax(dim=1).diagonal(dim1=1, dim2=2)
    p = torch.empty(n, dtype=torch.float32, device=image_embeds.device)
    p[index[valid]] = (0.5 * (i2t + t2i))[valid]
    return p


@dataclass
class AnchorSet:
    """M fixed anchor pairs: their pool ids, L2-normalised embeddings and the sigmoid centres ``mu``."""

    sample_idx: torch.Tensor  # long [M], ascending
    image_embeds: torch.Tensor  # float32 [M, D]
    text_embeds: torch.Tensor
    mu_image: torch.Tensor  # float32 []
    mu_text: torch.Tensor

    @staticmethod
    def draw_ids(num_samples: int, num_anchors: int, seed: int) -> np.ndarray:
        """The anchor ids: ``min(M, N)`` distinct sample ids drawn with ``seed``, ascending."""
        m = min(int(num_anchors), int(num_samples))
        return np.sort(np.random.default_rng([int(seed), 1]).choice(int(num_samples), size=m, replace=False))

    @classmethod
    def from_embeddings(cls, sample_idx, image_embeds, text_embeds) -> AnchorSet:
        order = torch.argsort(torch.as_tensor(sample_idx, dtype=torch.long))
        v = F.normalize(image_embeds.float(), dim=-1)[order].cpu()
        u = F.normalize(text_embeds.float(), dim=-1)[order].cpu()
        ids = torch.as_tensor(sample_idx, dtype=torch.long)[order]
        if ids.numel() < 2:
            raise ValueError("GSC structure scores need at least 2 anchor pairs")
        rows = torch.arange(ids.numel())
        return cls(ids, v, u, mean_anchor_cosine(v, rows, 4096), mean_anchor_cosine(u, rows, 4096))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in asdict(self).items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> AnchorSet:
        from safetensors.torch import load_file

        return cls(**load_file(str(path)))


@torch.no_grad()
def raw_shard_scores(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    sample_idx: torch.Tensor,
    anchors: AnchorSet,
    logit_scale: float,
    *,
    offset: int,
    chunk_size: int = 128,
    seed: int = 0,
    structure: StructureConfig | None = None,
    neg_clip_batch_size: int = 256,
    neg_clip_batches: int = 10,
) -> dict[str, torch.Tensor]:
    """``similarity`` (cosine), ``neg_clip_loss`` (:mod:`.neg_clip_loss`), ``positive_prob`` (p) and
    ``consistency`` (c) of one shard's pairs (float32 [n]).

    ``sample_idx`` (ascending) identifies the rows; an anchor that is one of them is excluded from its own
    profile. ``offset`` (the shard's first id in the manifest) seeds the chunks and the contrast batches."""
    structure = structure or DEFAULT_STRUCTURE
    n = image_embeds.shape[0]
    device = image_embeds.device
    v = F.normalize(image_embeds.float(), dim=-1)
    u = F.normalize(text_embeds.float(), dim=-1)
    if not (torch.isfinite(v).all() and torch.isfinite(u).all()):
        raise ValueError("embeddings contain NaN or inf")
    similarity = (v * u).sum(-1)
    if n >= 2:
        p = batched_positive_probability(v, u, logit_scale, chunk_size=chunk_size, seed=shard_seed(seed, offset))
    else:  # a one-pair chunk is trivially "matched": p = 1, as softmax over one entry
        p = torch.ones(n, device=device)
    neg_clip = neg_clip_loss(v, u, logit_scale, batch_size=neg_clip_batch_size, num_batches=neg_clip_batches,
                             seed=shard_seed(seed, offset))
    # anchors inside this shard are the shard's own rows (so self-exclusion by row works); the rest are appended
    ids = sample_idx.to(device).long()
    a_ids = anchors.sample_idx.to(device)
    pos = torch.searchsorted(ids, a_ids).clamp(max=max(n - 1, 0))
    inside = (ids[pos] == a_ids) if n > 0 else torch.zeros_like(a_ids, dtype=torch.bool)
    outside = ~inside
    appended = torch.cumsum(outside.long(), 0) - 1
    anchor_rows = torch.where(inside, pos, n + appended)
    all_v = torch.cat([v, anchors.image_embeds.to(device)[outside]])
    all_u = torch.cat([u, anchors.text_embeds.to(device)[outside]])
    mu = (anchors.mu_image.to(device), anchors.mu_text.to(device))
    c = anchor_consistency(all_v, all_u, anchor_rows, structure=structure, mu=mu, num_rows=n)
    return {"similarity": similarity.float(), "neg_clip_loss": neg_clip.float(), "positive_prob": p.float(),
            "consistency": c.float()}


@dataclass
class PosteriorFit:
    """Min-max normalisation + 2-component GMM of one score, as numbers; ``means is None``: no evidence (1)."""

    lo: float
    hi: float
    means: list[float] | None
    variances: list[float] | None
    mixing: list[float] | None
    num_fit: int
    converged: bool | None
    monotone: bool = True

    @classmethod
    def fit(cls, values: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
            max_fit_samples: int = 200_000, seed: int = 0, monotone: bool = True) -> PosteriorFit:
        """As :func:`hf_mmsel.gsc.buffers.gmm_clean_posterior` (docs/design.md, GSC §4): normalise, subsample, fit."""
        x = values.detach().double().flatten().cpu()
        lo, hi = float(x.min()), float(x.max())
        if not hi - lo > 1e-12:
            return cls(lo, hi, None, None, None, 0, None, monotone)
        normalised = (x - lo) / (hi - lo)
        if normalised.numel() > max_fit_samples:
            pick = torch.randperm(normalised.numel(), generator=torch.Generator().manual_seed(seed))[:max_fit_samples]
            normalised = normalised[pick]
        if not bool(normalised.max() > normalised.min()):
            return cls(lo, hi, None, None, None, normalised.numel(), None, monotone)
        g = fit_two_gaussians(normalised, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
        return cls(lo, hi, g.means.tolist(), g.variances.tolist(), g.mixing.tolist(), normalised.numel(),
                   bool(g.converged), monotone)

    @property
    def low_weight(self) -> float | None:
        """Mixing weight of the lower-mean (noisy) component: the fit's estimate of the noise rate."""
        return None if self.means is None else float(self.mixing[int(np.argmin(self.means))])

    @property
    def separation(self) -> float | None:
        """Ashman's D = |μ₁ - μ₂| · sqrt(2 / (σ₁² + σ₂²)) of the two components (D > 2: two distinct modes)."""
        if self.means is None:
            return None
        return abs(self.means[0] - self.means[1]) * math.sqrt(2.0 / max(sum(self.variances), 1e-300))

    def posterior(self, values: torch.Tensor) -> torch.Tensor:
        """Posterior of the higher-mean (clean) component, float32, on ``values``' device."""
        if self.means is None:
            return torch.ones_like(values, dtype=torch.float32)
        g = TwoGaussians(torch.tensor(self.means, dtype=torch.float64), torch.tensor(self.variances, dtype=torch.float64),
                         torch.tensor(self.mixing, dtype=torch.float64), 0, bool(self.converged))
        normalised = (values.double() - self.lo) / (self.hi - self.lo)
        return high_mean_posterior(normalised, g, monotone=self.monotone).float()


@dataclass
class CleanMixture:
    """Everything fitted once on the seeded fit sample: the GMM posteriors of ``c`` and (``prob_posterior``) of
    ``log p`` (``gsc_clean_prob = min(π(c), P)``), and the quantiles of every :data:`curation_score.COMPONENTS`
    column (``curation_score``, :mod:`.curation_score`)."""

    consistency: PosteriorFit
    positive: PosteriorFit | None
    fit_shards: list[str]
    quantiles: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, consistency: torch.Tensor, positive_prob: torch.Tensor, *, prob_posterior: bool, seed: int,
            fit_shards: list[str], quantile_values: dict[str, torch.Tensor] | None = None, **gmm: Any
            ) -> CleanMixture:
        c_fit = PosteriorFit.fit(consistency, seed=seed, **gmm)
        p_fit = PosteriorFit.fit(_log_p(positive_prob), seed=seed, **gmm) if prob_posterior else None
        quantiles = {k: empirical_quantiles(v) for k, v in (quantile_values or {}).items()}
        return cls(c_fit, p_fit, list(fit_shards), quantiles)

    def apply(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pi = self.consistency.posterior(raw["consistency"])
        p = raw["positive_prob"].float()
        prob_clean = self.positive.posterior(_log_p(p)) if self.positive is not None else p
        return {"gsc_clean_prob": torch.minimum(pi, prob_clean), "structure_posterior": pi,
                "prob_clean": prob_clean}

    def noise_estimate(self) -> dict[str, Any]:
        """The noise rate as the noisy component's weight in ONE fit: the ``log p`` mixture (or ``c`` without
        ``prob_posterior``). ``rate``, ``separation`` (Ashman's D; < :data:`MIN_SEPARATION`: no distinct noisy
        mode, so the rate is unreliable) and the ``score`` it comes from. The share of pairs with
        ``gsc_clean_prob < 0.5`` is a union of two tests (either posterior below 0.5) and overestimates the rate
        whenever either fit is poor (docs/design.md, Curation §3)."""
        fit, score = (self.positive, "log positive_prob") if self.positive is not None else (self.consistency,
                                                                                              "consistency")
        return {"rate": fit.low_weight, "separation": fit.separation, "score": score,
                "reliable": fit.separation is not None and fit.separation >= MIN_SEPARATION}

    def curation_score(self, columns: dict[str, torch.Tensor], components: tuple[str, ...]) -> torch.Tensor:
        """:func:`.curation_score.combine` with this fit's quantiles."""
        missing = [k for k in components if k in columns and k not in self.quantiles]
        if missing:
            raise ValueError(f"mixture.json has no quantiles of {missing}: it was fitted by an older version; "
                             "re-run with --overwrite_output_dir")
        return combine(columns, self.quantiles, components)

    def to_dict(self) -> dict[str, Any]:
        return {"consistency": asdict(self.consistency),
                "positive": None if self.positive is None else asdict(self.positive),
                "fit_shards": self.fit_shards, "quantiles": self.quantiles}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")  # repr floats: exact round trip

    @classmethod
    def load(cls, path: str | Path) -> CleanMixture:
        d = json.loads(Path(path).read_text())
        return cls(PosteriorFit(**d["consistency"]), None if d["positive"] is None else PosteriorFit(**d["positive"]),
                   d["fit_shards"], d.get("quantiles", {}))


def _log_p(p: torch.Tensor) -> torch.Tensor:
    # the GMM sees log p, as in gsc_clean_probability: raw p is heavily right-skewed
    return torch.log(p.double().clamp_min(1e-30))


def dissect_score(similarity: torch.Tensor, hist: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """DISSect's differential ``h - s`` with ``s = 100·max(cos, 0)``; NaN for pairs never scored in training."""
    diff = hist.float() - 100.0 * similarity.float().clamp(min=0.0)
    return torch.where(seen.bool(), diff, torch.full_like(diff, math.nan))
