"""negCLIPLoss, curation_score (quantile mean) and the noise-rate estimate of hf_mmsel.curation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.curation.contrast_batches import seeded_chunks
from hf_mmsel.curation.curation_score import combine, empirical_quantiles, parse_components, quantile_rank
from hf_mmsel.curation.neg_clip_loss import batch_seed, neg_clip_loss


def _paper_neg_clip_loss(v, u, logit_scale, batches):
    """A direct transcription of Wang et al. (2024), eq. for negCLIPLoss: -(τ/K) Σ_k ℓ_{B_k}(i), with the CLIP loss
    ℓ_B(i) = -½[log(exp(s_ii/τ) / Σ_{j∈B} exp(s_ij/τ)) + log(exp(s_ii/τ) / Σ_{j∈B} exp(s_ji/τ))], in float64 loops."""
    tau = 1.0 / logit_scale
    n = v.shape[0]
    s = (v.double() @ u.double().T).tolist()
    total = [0.0] * n
    for batch_list in batches:  # one batching k: a partition of the pairs into contrast batches
        for members in batch_list:
            for i in members:
                i2t = math.exp(s[i][i] / tau) / sum(math.exp(s[i][j] / tau) for j in members)
                t2i = math.exp(s[i][i] / tau) / sum(math.exp(s[j][i] / tau) for j in members)
                loss = -0.5 * (math.log(i2t) + math.log(t2i))
                total[i] += -tau * loss
    return torch.tensor(total, dtype=torch.float64) / len(batches)


@pytest.mark.parametrize("n,batch_size,k,scale", [(37, 10, 3, 7.0), (64, 64, 2, 100.0), (5, 256, 4, 1.0)])
def test_neg_clip_loss_matches_the_paper_formula(n, batch_size, k, scale):
    g = torch.Generator().manual_seed(n)
    v = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    u = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    got = neg_clip_loss(v, u, scale, batch_size=batch_size, num_batches=k, seed=11)
    batches = []
    for j in range(k):
        index, valid = seeded_chunks(n, batch_size, batch_seed(11, j))
        batches.append([row[ok].tolist() for row, ok in zip(index, valid)])
    assert sorted(i for part in batches[0] for i in part) == list(range(n))  # each batching partitions the pool
    torch.testing.assert_close(got.double(), _paper_neg_clip_loss(v, u, scale, batches), atol=2e-6, rtol=0)
    # the decomposition s_ii - R with R >= s_ii (a pair is one of its batch's candidates), so negCLIPLoss <= 0
    assert bool((got <= 1e-6).all())
    assert torch.equal(got, neg_clip_loss(v, u, scale, batch_size=batch_size, num_batches=k, seed=11))
    assert not torch.equal(got, neg_clip_loss(v, u, scale, batch_size=batch_size, num_batches=k, seed=12)) or n <= \
        batch_size  # one batch holding every pair does not depend on the seed


def test_neg_clip_loss_penalises_a_generic_caption():
    """Two pairs with the same CLIP score: the one whose caption also matches every other image ranks lower."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(32, 8, generator=g), dim=-1)
    u = v.clone()
    mean_image = F.normalize(v[2:].mean(0), dim=-1)
    u[0] = F.normalize(0.6 * v[0] + 0.8 * mean_image, dim=-1)  # generic: close to the other images too
    cos = float(v[0] @ u[0])
    away = torch.randn(8, generator=g)
    away = F.normalize(away - (away @ v[1]) * v[1], dim=-1)  # orthogonal to v[1]
    u[1] = F.normalize(cos * v[1] + math.sqrt(1 - cos**2) * away, dim=-1)  # the same CLIP score, not generic
    score = neg_clip_loss(v, u, 10.0, batch_size=32, num_batches=1)
    assert abs(float(v[1] @ u[1]) - cos) < 1e-5
    assert float(score[0]) < float(score[1])  # equal s_ii, larger normaliser R for the generic caption


def test_neg_clip_loss_rejects_bad_settings():
    v = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="positive logit scale"):
        neg_clip_loss(v, v, 0.0)
    with pytest.raises(ValueError, match="num_batches"):
        neg_clip_loss(v, v, 1.0, num_batches=0)


def test_curation_score_is_the_mean_pool_quantile():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), 5 + 100 * torch.randn(1000, generator=g)
    qa, qb = empirical_quantiles(a), empirical_quantiles(b)
    ra, rb = quantile_rank(a, qa), quantile_rank(b, qb)
    # F(x) of the pool itself is (about) the rank / N, whatever the scale
    for x, r in ((a, ra), (b, rb)):
        ranks = torch.argsort(torch.argsort(x)).float() / (x.numel() - 1)
        assert float((r - ranks).abs().max()) < 2e-3
    torch.testing.assert_close(combine({"similarity": a, "gsc_weight": b}, {"similarity": qa, "gsc_weight": qb},
                                       ("similarity", "gsc_weight")), (ra + rb) / 2)
    # a component not computed (no training state) is dropped; none at all is an error
    torch.testing.assert_close(combine({"similarity": a}, {"similarity": qa}, ("similarity", "gsc_weight")), ra)
    with pytest.raises(ValueError, match="none of the curation score components"):
        combine({}, {}, ("gsc_weight",))
    # outside the fitted range: 0 and 1; ties share the middle rank; NaN stays NaN
    q = empirical_quantiles(torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0]))
    r = quantile_rank(torch.tensor([-5.0, 1.0, 9.0, math.nan]), q)
    assert r[0] == 0 and r[2] == 1 and 0.25 < float(r[1]) < 0.75 and math.isnan(float(r[3]))
    assert parse_components("neg_clip_loss + gsc_weight") == ("neg_clip_loss", "gsc_weight")
    with pytest.raises(ValueError, match="unknown: \\['cosine'\\]"):
        parse_components("cosine+gsc_weight")


def test_noise_estimate_is_one_fit_and_flags_a_missing_noisy_mode():
    from hf_mmsel.curation import CleanMixture

    g = torch.Generator().manual_seed(0)
    n = 4000
    noisy = torch.rand(n, generator=g) < 0.3
    # a two-mode log p (30 % noisy) and a c that a poor fit would split differently
    log_p = torch.where(noisy, -6 + 0.5 * torch.randn(n, generator=g), -0.5 + 0.3 * torch.randn(n, generator=g))
    c = torch.where(torch.rand(n, generator=g) < 0.5, 0.2, 0.8) + 0.05 * torch.randn(n, generator=g)
    mixture = CleanMixture.fit(c, log_p.exp(), prob_posterior=True, seed=0, fit_shards=["s"], max_iter=100,
                               tol=1e-6)
    estimate = mixture.noise_estimate()
    assert estimate["reliable"] and abs(estimate["rate"] - 0.3) < 0.03 and estimate["score"] == "log positive_prob"
    union = float((mixture.apply({"consistency": c, "positive_prob": log_p.exp()})["gsc_clean_prob"] < 0.5).float().mean())
    assert union > 0.5  # the old estimate: either posterior below 0.5
    one_mode = CleanMixture.fit(c, (-1 + 0.3 * torch.randn(n, generator=g)).exp(), prob_posterior=True, seed=0,
                                fit_shards=["s"], max_iter=100, tol=1e-6)
    assert not one_mode.noise_estimate()["reliable"]
