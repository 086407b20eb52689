"""GSC core: structure profiles, consistency, p, anchor bank, GMM, buffers/epoch update and the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.gsc import (
    AnchorBank,
    GSCBuffers,
    GSCPlusBuffers,
    StructureConfig,
    fit_two_gaussians,
    gsc_loss,
    high_mean_posterior,
    positive_map,
    positive_probability,
    self_exclusion_mask,
    structure_consistency,
    structure_infonce,
    structure_matching,
    structure_profiles,
    weighted_bidirectional_infonce,
)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


def _cos(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------------------- structure
def test_positive_maps():
    cos = torch.tensor([[1.0, 0.2], [-0.4, 0.6]])
    torch.testing.assert_close(positive_map(cos, torch.ones_like(cos, dtype=torch.bool), "affine", 0.1),
                               torch.tensor([[1.0, 0.6], [0.3, 0.8]]))
    valid = torch.tensor([[False, True], [True, True]])  # mu over the valid entries only: (0.2-0.4+0.6)/3
    mu = 0.4 / 3
    expected = torch.sigmoid((cos - mu) / 0.5)
    torch.testing.assert_close(positive_map(cos, valid, "sigmoid", 0.5), expected)
    with pytest.raises(ValueError, match="similarity"):
        positive_map(cos, valid, "relu", 0.1)  # type: ignore[arg-type]


def test_profiles_consistency_hand_checked_and_self_excluded():
    v = _unit([1, 0], [0, 1], [1, 1])
    u = _unit([1, 0], [1, 1], [0, 1])
    w = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    exclude = torch.eye(3, dtype=torch.bool)
    prof = structure_profiles(v, u, v, u, w, exclude, similarity="affine")
    s = 1 / math.sqrt(2)
    f = lambda x: (1 + x) / 2  # noqa: E731
    # image profile of sample 0 over anchors (self, 1, 2) = (0, f(0)*0.5, f(s)*1)
    expected_img = torch.tensor(
        [[0, f(0) * 0.5, f(s)], [f(0), 0, f(s)], [f(s), f(s) * 0.5, 0]], dtype=torch.float64
    )
    expected_txt = torch.tensor(
        [[0, f(s) * 0.5, f(0)], [f(s), 0, f(s)], [f(0), f(s) * 0.5, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(prof.image, expected_img)
    torch.testing.assert_close(prof.text, expected_txt)
    c = structure_consistency(prof)
    # self excluded: c_0 is the cosine over the two other anchors only
    torch.testing.assert_close(c[0].item(), _cos([f(0) * 0.5, f(s)], [f(s) * 0.5, f(0)]))
    torch.testing.assert_close(c[1].item(), _cos([f(0), f(s)], [f(s), f(s)]))
    # Pearson variant: centred over the valid entries only
    cp = structure_consistency(prof, centered=True)
    a, b = np.array([f(0), f(s)]), np.array([f(s), f(s)])
    assert abs(cp[1].item() - 0.0) < 1e-9  # text profile of 1 is constant -> zero after centring, c defined
    a, b = np.array([f(0) * 0.5, f(s)]), np.array([f(s) * 0.5, f(0)])
    torch.testing.assert_close(cp[0].item(), _cos(a - a.mean(), b - b.mean()))
    # including the diagonal would change c (self similarity 1 -> f(1) = 1 in both profiles)
    with_self = structure_consistency(structure_profiles(v, u, v, u, w, None, similarity="affine"))
    assert not torch.allclose(with_self, c)


def test_anchor_weight_zero_equals_removing_the_anchor():
    torch.manual_seed(0)
    v, u = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    w = torch.tensor([1.0, 0.7, 0.0, 1.0, 0.3, 0.9])
    ex = torch.eye(6, dtype=torch.bool)
    full = structure_consistency(structure_profiles(v, u, v, u, w, ex, similarity="affine"))
    keep = torch.tensor([0, 1, 3, 4, 5])
    reduced = structure_consistency(
        structure_profiles(v, u, v[keep], u[keep], w[keep], ex[:, keep], similarity="affine")
    )
    torch.testing.assert_close(full, reduced)
    # all anchors weighted zero -> c = 0, not NaN
    zero = structure_consistency(structure_profiles(v, u, v, u, torch.zeros(6), ex))
    assert torch.equal(zero, torch.zeros(6))


def test_positive_probability_hand_checked():
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    i2t = torch.tensor([math.exp(2) / (math.exp(2) + 1), 0.5])
    t2i = torch.tensor([math.exp(2) / (math.exp(2) + math.e), math.e / (1 + math.e)])
    torch.testing.assert_close(positive_probability(s), 0.5 * (i2t + t2i))


def test_structure_matching_modes_and_infonce():
    torch.manual_seed(1)
    v, u = F.normalize(torch.randn(5, 3), dim=1), F.normalize(torch.randn(5, 3), dim=1)
    prof = structure_profiles(v, u, v, u, torch.ones(5), torch.eye(5, dtype=torch.bool))
    g = structure_matching(prof, matching="cosine", matching_temperature=0.2)
    torch.testing.assert_close(g.diagonal() * 0.2, structure_consistency(prof))
    g_dot = structure_matching(prof, matching="dot")  # default temperature M/10 = 0.5
    torch.testing.assert_close(g_dot, prof.image @ prof.text.T / 0.5)
    loss = structure_infonce(g)
    torch.testing.assert_close(loss, -torch.log_softmax(g, dim=1).diagonal())


def test_bank_copy_of_the_sample_is_excluded():
    torch.manual_seed(2)
    v, u = F.normalize(torch.randn(4, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    idx = torch.tensor([10, 11, 12, 13])
    bank_v = torch.cat([v[1:2], F.normalize(torch.randn(2, 3), dim=1)])
    bank_u = torch.cat([u[1:2], F.normalize(torch.randn(2, 3), dim=1)])
    bank_idx = torch.tensor([11, 20, 21])
    mask = self_exclusion_mask(idx, bank_idx)
    assert mask.tolist()[1] == [True, False, False] and int(mask.sum()) == 1
    cfg = StructureConfig(similarity="affine")
    out = gsc_loss(v, u, 10.0, None, (bank_v, bank_u), torch.ones(3), sample_idx=idx, anchor_sample_idx=bank_idx,
                   structure=cfg)
    # reference for row 1: batch anchors {0,2,3} + bank anchors {20,21}
    av, au = torch.cat([v[[0, 2, 3]], bank_v[1:]]), torch.cat([u[[0, 2, 3]], bank_u[1:]])
    ref = structure_consistency(structure_profiles(v[1:2], u[1:2], av, au, torch.ones(5), similarity="affine"))
    torch.testing.assert_close(out.consistency[1], ref[0])


def test_anchor_bank_fifo_threshold_priority_and_state():
    bank = AnchorBank(3, 2, min_weight=0.5)
    emb = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    n = bank.update(emb, -emb, torch.tensor([0.9, 0.1, 0.6, 1.0]), torch.tensor([5, 6, 7, 8]))
    assert n == 3 and len(bank) == 3
    assert bank.sample_idx.tolist() == [8, 5, 7]  # highest weight first, low-weight 6 rejected
    bank.update(emb[:1], -emb[:1], torch.tensor([0.8]), torch.tensor([9]))
    assert bank.sample_idx.tolist() == [9, 5, 7]  # oldest slot overwritten
    table = torch.linspace(0, 1, 10)
    _, _, w, idx = bank.anchors(table)
    torch.testing.assert_close(w, table[idx])
    other = AnchorBank(3, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.image_embeds, bank.image_embeds) and len(other) == 3
    with pytest.raises(ValueError, match="shape"):
        AnchorBank(4, 2).load_state_dict(bank.state_dict())


# --------------------------------------------------------------------------------------------------- GMM
def _two_clusters(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = 0.8 + 0.05 * torch.randn(int(0.6 * n), generator=g, dtype=torch.float64)
    noisy = 0.3 + 0.1 * torch.randn(n - clean.numel(), generator=g, dtype=torch.float64)
    return torch.cat([noisy, clean]), torch.cat([torch.zeros(noisy.numel()), torch.ones(clean.numel())])


def test_gmm_posterior_orders_components_by_mean_and_matches_sklearn():
    from sklearn.mixture import GaussianMixture

    x, is_clean = _two_clusters()
    g = fit_two_gaussians(x, max_iter=100, tol=1e-6, reg_covar=5e-4)
    assert g.means[0] < g.means[1]
    assert abs(g.means[1].item() - 0.8) < 0.03 and abs(g.means[0].item() - 0.3) < 0.05
    post = high_mean_posterior(x, g, monotone=False)
    assert ((post > 0.5).double() == is_clean).double().mean() > 0.97
    sk = GaussianMixture(2, max_iter=100, tol=1e-6, reg_covar=5e-4, random_state=0).fit(x.numpy()[:, None])
    sk_post = sk.predict_proba(x.numpy()[:, None])[:, int(np.argmax(sk.means_[:, 0]))]
    assert np.abs(sk_post - post.numpy()).max() < 1e-3
    # monotone posterior: beyond the clean mean never less clean than at the mean
    post_m = high_mean_posterior(torch.tensor([g.means[1].item(), 5.0]), g)
    assert post_m[1] >= post_m[0]


# ------------------------------------------------------------------------------------------------ buffers
def _filled_buffers(n=300, seed=0, **kwargs):
    x, _ = _two_clusters(n, seed)
    buf = GSCBuffers(n, **kwargs)
    p = torch.linspace(0.05, 0.95, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for chunk in perm.split(64):
        buf.record(chunk, x[chunk].float(), p[chunk])
    return buf, x, p


def test_epoch_one_weights_are_min_of_shrunk_p_and_posterior():
    buf, x, p = _filled_buffers(bias_correction=False)  # GSC's code: both EMAs start at 1
    assert torch.equal(buf.weight, torch.ones(300, dtype=buf.weight.dtype))
    assert buf.storage.state.nbytes() == 12 * 300  # five float16 arrays + the diagnostic posterior
    stats = buf.epoch_update(beta=0.7)
    assert stats.num_seen == 300 and not stats.degenerate and stats.gmm_means[0] < stats.gmm_means[1]
    pi = buf.clean_posterior.float()
    torch.testing.assert_close(buf.weight.float(), torch.minimum(0.7 * p + 0.3, 0.7 * pi + 0.3), atol=2e-3, rtol=0)
    assert pi[x.argmax()] > 0.9 and pi[x.argmin()] < 0.1  # clean = higher-mean component
    assert not buf.seen.any()
    # epoch 2: EMAs continue from epoch 1, only the samples seen are updated
    w1, et1, ep1 = buf.weight.clone(), buf.ema_topo.clone(), buf.ema_pred.clone()
    idx = torch.arange(0, 300, 2)
    buf.record(idx, x[idx].float(), torch.full((150,), 0.5))
    buf.epoch_update(beta=0.7)
    close = dict(atol=2e-3, rtol=0)
    torch.testing.assert_close(buf.ema_pred[idx].float(), 0.7 * 0.5 + 0.3 * ep1[idx].float(), **close)
    torch.testing.assert_close(buf.ema_topo[idx].float(),
                               0.7 * buf.clean_posterior[idx].float() + 0.3 * et1[idx].float(), **close)
    torch.testing.assert_close(buf.weight[idx], torch.minimum(buf.ema_pred[idx], buf.ema_topo[idx]))
    odd = torch.arange(1, 300, 2)
    assert torch.equal(buf.weight[odd], w1[odd])


def test_bias_corrected_ema_is_the_normalised_weighted_mean_of_each_pairs_own_estimates():
    """E_n = Σ_s β(1-β)^(n-s) x_s / (1-(1-β)^n) over the passes that saw the pair (n counted per pair): the first
    estimate replaces the prior 1; pairs skipped in a pass (selection) keep E and n."""
    n, beta = 300, 0.3
    buf, x, p = _filled_buffers(n)
    assert buf.storage.state.nbytes() == 13 * n  # + the uint8 pass count
    gen = torch.Generator().manual_seed(1)
    history_p: list[list[float]] = [[] for _ in range(n)]
    history_pi: list[list[float]] = [[] for _ in range(n)]
    for step in range(6):
        if step:  # a random subset seen, with new p
            idx = torch.randperm(n, generator=gen)[: n // 2 + 20 * step]
            p_new = torch.rand(idx.numel(), generator=gen)
            buf.record(idx, x[idx].float() + 0.05 * torch.randn(idx.numel(), generator=gen), p_new)
        else:
            idx, p_new = torch.arange(n), p
        buf.epoch_update(beta=beta)
        for j, i in enumerate(idx.tolist()):
            history_p[i].append(float(p_new[j]))
            history_pi[i].append(float(buf.clean_posterior[i]))

    def corrected(values):
        k = len(values)
        weights = [beta * (1 - beta) ** (k - 1 - s) for s in range(k)]
        return sum(w * v for w, v in zip(weights, values)) / (1 - (1 - beta) ** k)

    expected_pred = torch.tensor([corrected(h) for h in history_p])
    expected_topo = torch.tensor([corrected(h) for h in history_pi])
    torch.testing.assert_close(buf.ema_pred.float(), expected_pred, atol=5e-3, rtol=0)
    torch.testing.assert_close(buf.ema_topo.float(), expected_topo, atol=5e-3, rtol=0)
    assert buf.num_estimates.tolist() == [len(h) for h in history_p]
    torch.testing.assert_close(buf.weight.float(), torch.minimum(expected_pred, expected_topo), atol=5e-3, rtol=0)
    # after one pass the weight is min(p, π) itself: no prior of 1 left (GSC's code: 0.3 + 0.7·x)
    first, _, p1 = _filled_buffers(n)
    first.epoch_update(beta=beta)
    torch.testing.assert_close(first.weight.float(), torch.minimum(p1, first.clean_posterior.float()), atol=2e-3,
                               rtol=0)
    # prior_beta = beta is GSC's EMA (started at 1) exactly; prior_beta < 1 keeps the prior's share in w
    for prior_beta in (0.3, 0.9):
        plain, _, _ = _filled_buffers(n, bias_correction=False)
        split, _, _ = _filled_buffers(n)
        for step in range(3):
            plain.epoch_update(beta=beta)
            split.epoch_update(beta=beta, prior_beta=prior_beta)
            plain.record(torch.arange(n), x.float(), p.flip(0))
            split.record(torch.arange(n), x.float(), p.flip(0))
        if prior_beta == beta:
            torch.testing.assert_close(split.weight.float(), plain.weight.float(), atol=3e-3, rtol=0)
        else:  # w = (1-β₀)^n + (1 - (1-β₀)^n) min(E_pred, E_topo), here n = 3
            share = (1 - prior_beta) ** 3
            expected = share + (1 - share) * torch.minimum(split.ema_pred.float(), split.ema_topo.float())
            torch.testing.assert_close(split.weight.float(), expected, atol=3e-3, rtol=0)
    with pytest.raises(ValueError, match="prior_beta"):
        buf.epoch_update(prior_beta=0.0)
    # the count is state: a checkpoint of one kind does not load into the other
    with pytest.raises(ValueError, match="gsc_ema_bias_correction=True"):
        GSCBuffers(n, bias_correction=False).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="gsc_ema_bias_correction=False"):
        GSCBuffers(n).load_state_dict(GSCBuffers(n, bias_correction=False).state_dict())


def test_degenerate_scores_give_defined_weights():
    buf = GSCBuffers(10, bias_correction=False)
    buf.record(torch.arange(10), torch.full((10,), 0.42), torch.full((10,), 0.2))
    stats = buf.epoch_update()
    assert stats.degenerate
    assert torch.isfinite(buf.weight).all()
    torch.testing.assert_close(buf.weight.float(), torch.full((10,), 0.7 * 0.2 + 0.3), atol=2e-3, rtol=0)  # π = 1
    assert buf.epoch_update().num_seen == 0  # nothing seen: no-op, no NaN
    assert torch.isfinite(buf.weight).all()
    with pytest.raises(ValueError, match="non-finite"):
        buf.record(torch.tensor([0, 1]), torch.tensor([float("nan"), 0.1]), torch.tensor([0.5, 0.5]))


def test_subsample_fit_and_determinism():
    a, x, _ = _filled_buffers(n=3000, seed=3)
    b, _, _ = _filled_buffers(n=3000, seed=3)
    full, _, _ = _filled_buffers(n=3000, seed=3)
    sa = a.epoch_update(max_fit_samples=500, seed=7)
    b.epoch_update(max_fit_samples=500, seed=7)
    full.epoch_update()
    assert sa.num_fit == 500 and sa.num_seen == 3000
    assert torch.equal(a.weight, b.weight) and torch.equal(a.clean_posterior, b.clean_posterior)
    assert (a.clean_posterior - full.clean_posterior).abs().mean() < 0.05  # subsample fit predicts for all
    c, _, _ = _filled_buffers(n=3000, seed=3)
    c.epoch_update(max_fit_samples=500, seed=8)
    assert not torch.equal(c.clean_posterior, a.clean_posterior)  # the seed picks the subsample


def test_broadcast_fn_makes_rank0_authoritative():
    buf, _, _ = _filled_buffers()
    calls = []

    def fake_broadcast(t):
        calls.append(t.shape)
        return torch.full_like(t, 0.25)

    buf.epoch_update(broadcast_fn=fake_broadcast)
    assert calls == [(4, 300)] and torch.equal(buf.weight, torch.full((300,), 0.25))


def test_record_duplicates_keep_last_and_errors():
    buf = GSCBuffers(5)
    buf.record(torch.tensor([1, 3, 1]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6]))
    assert buf.consistency[1].item() == pytest.approx(0.3, rel=1e-3)
    assert buf.positive_prob[1].item() == pytest.approx(0.6, rel=1e-3)
    assert buf.seen.tolist() == [False, True, False, True, False]
    with pytest.raises(IndexError, match="out of range"):
        buf.record(torch.tensor([5]), torch.tensor([0.1]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="indices"):
        buf.record(torch.tensor([0, 1]), torch.tensor([0.1]), torch.tensor([0.1, 0.2]))


def test_state_dict_round_trip_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    buf, _, _ = _filled_buffers()
    buf.epoch_update()
    buf.record(torch.tensor([0, 1]), torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2]))
    save_file(buf.state_dict(), str(tmp_path / "gsc.safetensors"))
    restored = GSCBuffers(300)
    restored.load_state_dict(load_file(str(tmp_path / "gsc.safetensors")))
    for key, value in buf.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="300 samples"):
        GSCBuffers(299).load_state_dict(buf.state_dict())
    with pytest.raises(KeyError, match="ema_pred"):
        GSCBuffers(300).load_state_dict({k: v for k, v in buf.state_dict().items() if k != "ema_pred"})


def test_gsc_plus_uses_peer_weights():
    plus = GSCPlusBuffers(4)
    plus.networks[0].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    plus.networks[1].weight.copy_(torch.tensor([0.9, 0.8, 0.7, 0.6]))
    idx = torch.tensor([2, 0])
    assert plus.loss_weights(0, idx).tolist() == pytest.approx([0.7, 0.9], abs=1e-3)
    assert plus.loss_weights(1, idx).tolist() == pytest.approx([0.3, 0.1], abs=1e-3)
    other = GSCPlusBuffers(4)
    other.load_state_dict(plus.state_dict())
    assert torch.equal(other.networks[1].weight, plus.networks[1].weight)


# --------------------------------------------------------------------------------------------------- loss
def test_loss_gradient_finite_and_zero_weight_positive_contributes_nothing():
    torch.manual_seed(4)
    v = torch.randn(6, 5, requires_grad=True)
    u = torch.randn(6, 5, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 0.8, 1.0, 0.5, 1.0])
    out = gsc_loss(v, u, 1 / 0.07, w, gamma=0.5)
    out.loss.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(u.grad).all() and v.grad.abs().sum() > 0
    assert not out.consistency.requires_grad and not out.positive_prob.requires_grad
    # reference: weighted per-sample terms, divided by B; sample 1 appears only as a negative / zero anchor
    vn, un = F.normalize(v.detach(), dim=1), F.normalize(u.detach(), dim=1)
    s = vn @ un.T / 0.07
    per = 0.5 * (-s.log_softmax(1).diagonal() - s.log_softmax(0).diagonal())
    torch.testing.assert_close(out.contrastive_loss, (w * per).mean())
    g = structure_matching(structure_profiles(vn, un, vn, un, w, torch.eye(6, dtype=torch.bool)))
    torch.testing.assert_close(out.structure_loss, (w * structure_infonce(g)).mean())
    torch.testing.assert_close(out.loss, out.contrastive_loss + 0.5 * out.structure_loss)
    torch.testing.assert_close(out.positive_prob, positive_probability(s))
    # the positive logit S_11 of a zero-weight pair gets no gradient (its row and column terms are weighted 0),
    # while positive logits of weighted pairs do
    logits = s.clone().requires_grad_(True)
    weighted_bidirectional_infonce(logits, w).backward()
    assert logits.grad[1, 1] == 0 and (logits.grad.diagonal()[w > 0] < 0).all()
    assert logits.grad[0, 1] != 0  # ... but it still acts as a negative in other rows


def test_loss_with_bank_only_and_errors():
    torch.manual_seed(5)
    v, u = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    bank = AnchorBank(16, 4)
    bank.update(torch.randn(16, 4), torch.randn(16, 4), torch.ones(16), torch.arange(100, 116))
    bv, bu, bw, bidx = bank.anchors()
    cfg = StructureConfig(max_batch_anchors=0, centered=True)
    out = gsc_loss(v, u, 14.3, None, (bv, bu), bw, sample_idx=torch.arange(8), anchor_sample_idx=bidx, structure=cfg)
    out.loss.backward()
    assert torch.isfinite(v.grad).all() and out.consistency.shape == (8,)
    assert bank.image_embeds.grad is None
    with pytest.raises(ValueError, match="at least one anchor"):
        gsc_loss(v, u, 14.3, None, structure=cfg)
    with pytest.raises(ValueError, match="anchor_weights"):
        gsc_loss(v, u, 14.3, None, (bv, bu))
    with pytest.raises(ValueError, match="weights must have shape"):
        gsc_loss(v, u, 14.3, torch.ones(3))
    with pytest.raises(ValueError, match="similarity"):
        StructureConfig(similarity="cosine")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- hook
def test_gsc_hook_with_fake_embeddings_records_updates_and_round_trips():
    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.hooks import Dist, StepContext

    torch.manual_seed(6)
    n, d = 40, 8
    noisy = torch.arange(n) % 4 == 0  # fake embeddings: clean pairs aligned, every 4th pair mismatched
    base = F.normalize(torch.randn(n, d), dim=1)
    img, txt = base.clone(), base.clone() + 0.05 * torch.randn(n, d)
    txt[noisy] = txt[noisy].roll(1, dims=0)
    hook = GSCHook(gamma=0.1, bank_size=16)
    hook.setup(n, torch.device("cpu"))
    dist = Dist()
    for epoch in range(2):
        for step, idx in enumerate(torch.randperm(n).split(10)):
            ctx = StepContext(epoch, step, dist, scorer=lambda: None)
            v = img[idx].clone().requires_grad_(True)
            terms = hook.loss_terms(v, txt[idx], torch.tensor(10.0), idx, torch.zeros(10), ctx)
            terms.extra_loss.backward()
            assert torch.isfinite(v.grad).all() and terms.weights.shape == (10,)
        logs = hook.on_pass_end(epoch, dist)
        assert logs["gsc_num_updated"] == n
    w = hook.buffers.weight
    assert w[~noisy].mean() > w[noisy].mean() + 0.1 and len(hook.bank) == 16
    with torch.no_grad():  # evaluation: nothing recorded
        hook.loss_terms(img[:10], txt[:10], torch.tensor(10.0), torch.arange(10), torch.zeros(10),
                        StepContext(2, 0, dist, scorer=lambda: None))
    assert not hook.buffers.seen.any()
    restored = GSCHook(bank_size=16)
    restored.setup(n, torch.device("cpu"))
    restored.load_state_dict(hook.state_dict())
    for key, value in hook.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


# --------------------------------------------------------------------------------------- one objective
@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bank_size", [0, 8])
def test_public_gsc_loss_is_the_trainer_objective_at_world_size_1(loss_type, bank_size):
    """gsc_loss (local negatives) == the trainer's loss with GSCHook (PairLoss.per_sample, weighted mean + extra
    loss) on the same batch (to float32 rounding), with the same gradient and bit-identical c and p."""
    from hf_mmsel.contrastive_loss import PairLoss
    from hf_mmsel.gsc.buffers import STATE_DTYPE
    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.hooks import Dist, StepContext

    torch.manual_seed(11)
    bias = torch.tensor(-2.0) if loss_type == "sigmoid" else None
    pair_loss = PairLoss(loss_type, bias)
    hook = GSCHook(gamma=0.3, bank_size=bank_size, bank_min_weight=0.0)
    hook.setup(40, torch.device("cpu"))
    hook.buffers.weight.copy_(torch.rand(40))
    for step in range(2):  # step 1 also uses the bank filled by step 0
        idx = torch.randperm(40)[:10]
        image, text = torch.randn(10, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
        v, u = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        scale = torch.tensor(12.0)
        anchors = {}
        if hook.bank is not None and len(hook.bank):
            bv, bu, _, bidx = hook.bank.anchors()
            anchors = dict(anchor_embeds=(bv.clone(), bu.clone()), anchor_weights=hook.buffers.weights_for(bidx),
                           anchor_sample_idx=bidx.clone())  # views: the hook refreshes the bank
        ctx = StepContext(0, step, Dist(), scorer=None, loss=pair_loss)
        per_sample = pair_loss.per_sample(v, u, scale)
        terms = hook.loss_terms(v, u, scale, idx, per_sample, ctx)
        trainer_loss = (per_sample * terms.weights).mean() + terms.extra_loss
        grad_trainer = torch.autograd.grad(trainer_loss, image, retain_graph=True)[0]
        out = gsc_loss(v, u, scale, hook.buffers.weights_for(idx), gamma=0.3, sample_idx=idx, logit_bias=bias,
                       **anchors)
        # gsc_loss re-normalises the trainer's (already unit) rows: equal up to float32 rounding
        torch.testing.assert_close(out.loss, trainer_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out.loss, image)[0], grad_trainer, rtol=1e-5, atol=1e-7)
        assert torch.equal(hook.buffers.consistency[idx], out.consistency.to(STATE_DTYPE))
        assert torch.equal(hook.buffers.positive_prob[idx], out.positive_prob.to(STATE_DTYPE))
        assert bool(anchors) == (step == 1 and bank_size > 0)


def test_gsc_state_keeps_its_dtypes_under_bf16_autocast():
    """A GSC step and pass end under CPU bf16 autocast: c and p leave the core as float32, the per-sample buffers
    keep their storage dtype (never bf16), w is read back as float32."""
    from hf_mmsel.gsc.buffers import BUFFER_NAMES, STATE_DTYPE
    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.hooks import Dist, StepContext

    torch.manual_seed(12)
    hook = GSCHook(bank_size=4, bank_min_weight=0.0)
    hook.setup(16, torch.device("cpu"))
    proj = torch.nn.Linear(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in range(2):
            idx = torch.arange(8) + 8 * step
            image, text = proj(torch.randn(8, 8)), proj(torch.randn(8, 8))
            assert image.dtype == torch.bfloat16
            terms = hook.loss_terms(image, text, torch.tensor(10.0), idx, None, StepContext(0, step, Dist(), None))
            terms.extra_loss.backward()
            out = gsc_loss(image, text, 10.0, hook.buffers.weights_for(idx), sample_idx=idx)
            assert out.consistency.dtype == out.positive_prob.dtype == torch.float32
        hook.on_pass_end(0, Dist())
    for name in BUFFER_NAMES:
        assert getattr(hook.buffers, name).dtype == STATE_DTYPE != torch.bfloat16
    assert hook.bank.image_embeds.dtype == hook.bank.weights.dtype == torch.float32
    w = hook.buffers.weights_for(torch.arange(16))
    assert w.dtype == torch.float32 and bool(torch.isfinite(w).all()) and not torch.equal(w, torch.ones(16))
