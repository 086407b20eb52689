"""Selection cores (plain torch): score bank, strategies, the selection hook and the per-sample InfoNCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.hooks import BatchHook, Dist, HookList, LossTerms, PairEmbeddings, StepContext
from hf_mmsel.losses import clip_loss_per_sample
from hf_mmsel.selection import (
    SELECTION_STRATEGIES,
    ScoreBank,
    SelectionHook,
    build_strategy,
    clip_score,
    num_to_keep,
    selection_generator,
    top_k,
)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _ctx(epoch, step, emb, calls=None):
    def scorer():
        if calls is not None:
            calls.append(step)
        return emb

    return StepContext(epoch=epoch, step=step, dist=Dist(), scorer=scorer)


def _hook(strategy, rate=0.5, n=64, **kw):
    hook = SelectionHook(strategy, rate, seed=3, **kw)
    hook.setup(n, "cpu")
    return hook


# ------------------------------------------------------------------------------------------------ losses
def test_per_sample_loss_local_shards_average_to_global_loss():
    img, txt = _unit(8, 5, 0), _unit(8, 5, 1)
    scale = torch.tensor(7.0)
    full = clip_loss_per_sample(img, txt, scale)
    logits = scale * img @ txt.T
    reference = 0.5 * (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8)))
    torch.testing.assert_close(full.mean(), reference)
    # two simulated ranks: local rows against the gathered global columns (gather_fn sees images, then texts)
    shards = []
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)
        others = iter([img, txt])

        def gather(local, rank=rank, others=others):
            full_tensor = next(others).clone()
            full_tensor[4 * rank: 4 * rank + 4] = local
            return full_tensor

        shards.append(clip_loss_per_sample(img[rows], txt[rows], scale, gather_fn=gather, rank=rank))
    torch.testing.assert_close(torch.cat(shards), full)
    with pytest.raises(ValueError, match=r"\[k, d\]"):
        clip_loss_per_sample(img, txt[:3], scale)


# -------------------------------------------------------------------------------------------------- bank
def test_score_bank_overwrite_ema_first_visit_and_state():
    bank = ScoreBank(6)
    bank.update(torch.tensor([0, 2]), torch.tensor([10.0, 20.0]), mode="ema", beta=0.9)
    torch.testing.assert_close(bank.hist[[0, 2]], torch.tensor([10.0, 20.0]))  # first visit: h <- s
    bank.update(torch.tensor([2, 3]), torch.tensor([40.0, 5.0]), mode="ema", beta=0.9)
    torch.testing.assert_close(bank.hist[[2, 3]], torch.tensor([0.9 * 20 + 0.1 * 40, 5.0]))
    torch.testing.assert_close(bank.lookup(torch.tensor([3, 4]), fallback=-1.0), torch.tensor([5.0, -1.0]))
    bank.update(torch.tensor([3]), torch.tensor([7.0]), mode="overwrite")
    assert bank.hist[3] == 7.0 and bank.seen.tolist() == [True, False, True, True, False, False]
    other = ScoreBank(6)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.hist, bank.hist) and torch.equal(other.seen, bank.seen)
    with pytest.raises(ValueError, match="size mismatch"):
        ScoreBank(5).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="choose one of"):
        bank.update(torch.tensor([0]), torch.tensor([1.0]), mode="max")


# ---------------------------------------------------------------------------------------------- strategies
def test_batch_mean_centring_is_a_ranking_noop():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        h, s = 100 * torch.rand(40, generator=g), 100 * torch.rand(40, generator=g)
        centred = (h.double() - h.double().mean()) - (s.double() - s.double().mean())
        assert set(torch.topk(centred, 13).indices.tolist()) == set(top_k(h - s, 13).tolist())


def test_top_k_random_ties_keep_order_of_distinct_values():
    crit = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0, 9.0])
    picks = {tuple(sorted(top_k(crit, 3, torch.Generator().manual_seed(s)).tolist())) for s in range(20)}
    assert all({0, 5} <= set(p) for p in picks)  # the two distinct largest always kept
    assert len(picks) > 1  # the tie among the 1.0s is broken at random


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"select_rate must be in \(0, 1\]"):
        SelectionHook("random", 0.0)
    with pytest.raises(ValueError, match=r"select_rate must be in \(0, 1\]"):
        SelectionHook("random", 1.5)
    with pytest.raises(ValueError, match="dissect_ema") as err:
        build_strategy("jest")
    assert all(name in str(err.value) for name in SELECTION_STRATEGIES)
    with pytest.raises(ValueError, match="warmup_epochs >= 1"):
        build_strategy("dissect", warmup_epochs=0)
    with pytest.raises(ValueError, match="reference scores"):
        build_strategy("reference_clipscore")
    with pytest.raises(ValueError, match="choose one of"):
        build_strategy("dissect_ema", first_visit_fallback="mean")


@pytest.mark.parametrize("strategy", sorted(n for n, c in SELECTION_STRATEGIES.items()
                                             if n != "full" and not c.needs_reference))  # reference: test_learnability
@pytest.mark.parametrize("batch_size,rate", [(16, 0.5), (15, 0.3), (7, 1.0)])
def test_every_strategy_keeps_round_r_b_distinct_pairs(strategy, batch_size, rate):
    n = 64
    hook = _hook(strategy, rate, n, warmup_epochs=1, reference_scores=torch.rand(n))
    emb = PairEmbeddings(_unit(batch_size, 8, 0), _unit(batch_size, 8, 1), torch.tensor(10.0))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:batch_size]
    for epoch in range(3):
        keep = hook.prepare({"sample_idx": idx}, _ctx(epoch, epoch, emb))
        k = num_to_keep(batch_size, rate)
        assert k == max(1, round(rate * batch_size))
        assert keep.shape == (k,) and keep.unique().numel() == k and int(keep.max()) < batch_size


def test_full_keeps_everything_and_never_scores():
    hook, calls = _hook("full"), []
    emb = PairEmbeddings(_unit(8, 4, 0), _unit(8, 4, 1), torch.tensor(1.0))
    assert hook.prepare({"sample_idx": torch.arange(8)}, _ctx(0, 0, emb, calls)) is None
    assert calls == []


def test_dissect_warmup_skips_scoring_snapshots_last_warmup_epoch_then_tops_h_minus_s():
    n, warmup = 16, 3
    hook, calls = _hook("dissect", 0.25, n, warmup_epochs=warmup), []
    idx = torch.arange(n)
    embs = [PairEmbeddings(_unit(n, 6, 10 + e), _unit(n, 6, 20 + e), torch.tensor(10.0)) for e in range(5)]
    keeps = [hook.prepare({"sample_idx": idx}, _ctx(e, e, embs[e], calls)) for e in range(5)]
    assert calls == [2, 3, 4]  # epochs 0..W-2 need no scoring forward
    snapshot = clip_score(embs[2].image_embeds, embs[2].text_embeds)[1]
    torch.testing.assert_close(hook.bank.hist, snapshot)  # h = scores of epoch W-1, not overwritten later
    for e in (3, 4):
        s = clip_score(embs[e].image_embeds, embs[e].text_embeds)[1]
        assert set(keeps[e].tolist()) == set(torch.topk(snapshot - s, 4).indices.tolist())
    # warm-up epochs pick at random (seeded by step): differ between steps, reproducible for the same step
    assert keeps[0].tolist() != keeps[1].tolist()
    again = _hook("dissect", 0.25, n, warmup_epochs=warmup).prepare({"sample_idx": idx}, _ctx(1, 1, embs[1]))
    assert again.tolist() == keeps[1].tolist()


def test_dissect_ema_epoch0_fallback_zero_keeps_lowest_scores_then_ema():
    n = 12
    hook = _hook("dissect_ema", 0.5, n, ema_beta=0.9, first_visit_fallback="zero")
    idx = torch.arange(n)
    e0 = PairEmbeddings(_unit(n, 6, 1), _unit(n, 6, 2), torch.tensor(1.0))
    s0 = clip_score(e0.image_embeds, e0.text_embeds)[1]
    keep0 = hook.prepare({"sample_idx": idx}, _ctx(0, 0, e0))
    # d = 0 - s: the k lowest scores, ties at 0 (clamped negative cosines) broken at random among themselves
    assert sorted(s0[keep0].tolist()) == sorted(s0.tolist())[:6]
    torch.testing.assert_close(hook.bank.hist, s0)
    e1 = PairEmbeddings(_unit(n, 6, 3), _unit(n, 6, 4), torch.tensor(1.0))
    s1 = clip_score(e1.image_embeds, e1.text_embeds)[1]
    keep1 = hook.prepare({"sample_idx": idx}, _ctx(1, 1, e1))
    d = s0 - s1  # h_1 = s_0; compare values (ties between clamped zeros are broken at random)
    assert sorted(d[keep1].tolist()) == sorted(d.tolist())[-6:]
    torch.testing.assert_close(hook.bank.hist, 0.9 * s0 + 0.1 * s1)
    neutral = _hook("dissect_ema", 0.5, n, first_visit_fallback="score")
    picks = {tuple(sorted(neutral.prepare({"sample_idx": idx}, _ctx(0, s, e0)).tolist())) for s in range(6)}
    assert len(picks) > 1  # d = 0 for unseen pairs: random, not "lowest score"


def test_loss_strategies_and_clipscore_rank_by_their_scores():
    n = 10
    emb = PairEmbeddings(_unit(n, 6, 5), _unit(n, 6, 6), torch.tensor(5.0))
    losses = clip_loss_per_sample(emb.image_embeds, emb.text_embeds, emb.logit_scale)
    cos = clip_score(emb.image_embeds, emb.text_embeds)[0]
    idx = torch.arange(n)
    small = _hook("small_loss", 0.3, n).prepare({"sample_idx": idx}, _ctx(0, 0, emb))
    big = _hook("big_loss", 0.3, n).prepare({"sample_idx": idx}, _ctx(0, 0, emb))
    clip = _hook("clipscore", 0.3, n).prepare({"sample_idx": idx}, _ctx(0, 0, emb))
    assert set(small.tolist()) == set(torch.topk(-losses, 3).indices.tolist())
    assert set(big.tolist()) == set(torch.topk(losses, 3).indices.tolist())
    assert set(clip.tolist()) == set(torch.topk(cos, 3).indices.tolist())
    ref = torch.arange(20, dtype=torch.float32)
    ref_hook = _hook("reference_clipscore", 0.3, 20, reference_scores=ref)
    calls = []
    keep = ref_hook.prepare({"sample_idx": torch.tensor([3, 17, 5, 11, 0])}, _ctx(0, 0, emb, calls))
    assert set(keep.tolist()) == {1, 3} and calls == []  # 2 = round(0.3*5) largest reference scores, no forward


def test_hook_state_round_trip_and_noisy_bookkeeping():
    n = 20
    plain = _hook("dissect", 0.5, n, warmup_epochs=1)
    assert set(plain.state_dict()) == {"bank.hist", "bank.seen"} and plain.noisy is None  # diagnostics opt-in
    assert plain._storage.state.nbytes() == 5 * n  # DISSect: hist float32 + seen bool
    hook = _hook("dissect", 0.5, n, warmup_epochs=1, diagnostics=True)
    emb = PairEmbeddings(_unit(10, 4, 0), _unit(10, 4, 1), torch.tensor(1.0))
    noisy = torch.tensor([True, False] * 5)
    ctx = _ctx(0, 0, emb)
    keep = hook.prepare({"sample_idx": torch.arange(10, 20), "is_noisy": noisy}, ctx)
    torch.testing.assert_close(ctx.logs["selected_noisy_fraction"], noisy[keep].float().mean())
    assert hook.noisy[10:].tolist() == noisy.to(torch.int8).tolist() and (hook.noisy[:10] == -1).all()
    logs = hook.on_pass_end(0, Dist())
    assert "selection/epoch_noisy_score_mean" in logs and len(hook.epoch_histograms) == 1
    restored = _hook("dissect", 0.5, n, warmup_epochs=1, diagnostics=True)
    restored.load_state_dict(hook.state_dict())
    for key, value in hook.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


class _Weighting(BatchHook):
    """A GSC-shaped hook: per-sample weights from a buffer keyed by sample_idx, plus an extra loss."""

    def setup(self, num_samples, device):
        self.w = torch.linspace(0.1, 1.0, num_samples)

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx):
        return LossTerms(self.w[sample_idx], (image_embeds * text_embeds).sum() * 0.0 + 1.0, {"w_mean": self.w.mean()})

    def state_dict(self):
        return {"w": self.w}


def test_hook_list_composes_selection_then_weighting():
    n = 16
    hooks = HookList([SelectionHook("clipscore", 0.5, seed=0), SelectionHook("random", 0.5, seed=1), _Weighting()])
    hooks.setup(n, "cpu")
    emb = PairEmbeddings(_unit(n, 4, 0), _unit(n, 4, 1), torch.tensor(1.0))
    keep = hooks.prepare({"sample_idx": torch.arange(n)}, _ctx(0, 0, emb))
    assert keep.shape == (4,)
    cos = clip_score(emb.image_embeds, emb.text_embeds)[0]
    assert set(keep.tolist()) <= set(torch.topk(cos, 8).indices.tolist())  # second stage picks within the first
    terms = hooks.loss_terms(emb.image_embeds[keep], emb.text_embeds[keep], emb.logit_scale, keep,
                             torch.ones(4), _ctx(0, 0, emb))
    torch.testing.assert_close(terms.weights, hooks.hooks[2].w[keep])
    assert float(terms.extra_loss) == 1.0 and "w_mean" in terms.logs
    assert set(hooks.state_dict()) == {"2.w"}  # clipscore/random keep no per-sample bank
    assert HookList([SelectionHook("dissect_ema", 0.5)]).state_kinds() == ["selection"]


# ---------------------------------------------------------------------- literal port of the official loop
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1)


def _toy_data(n=48):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, generator=g)
    x = z @ torch.randn(4, 12, generator=g) + 0.3 * torch.randn(n, 12, generator=g)
    y = z @ torch.randn(4, 10, generator=g) + 0.3 * torch.randn(n, 10, generator=g)
    y[: n // 3] = y[: n // 3][torch.randperm(n // 3, generator=g)]  # noisy correspondence
    return x, y


def _batches(n, b, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch)).view(-1, b)


def _official_port(warmup_point, epochs, b, rate, seed):
    """src/train.py, ``warmup_base_sampling`` with accum_freq == 1, transcribed (dicts keyed by string keys,
    per-sample Python loops, batch-mean-centred differential, ``int(B*r)``); only the random pick uses our
    generator so that both loops draw the same warm-up subsets."""
    x, y = _toy_data()
    torch.manual_seed(0)
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    keys = [f"{i:06d}" for i in range(len(x))]
    warmup_score = {key: 0.0 for key in keys}
    picked, step = [], 0
    for epoch in range(epochs):
        for batch in _batches(len(x), b, epoch):
            batch_keys = [keys[i] for i in batch.tolist()]
            opt.zero_grad()
            with torch.no_grad():
                zi, zt = model(x[batch], y[batch])
                s = torch.clamp(100 * (zi * zt).sum(-1), min=0)
                k = int(b * rate)
                if epoch < warmup_point:
                    sel = torch.randperm(b, generator=selection_generator(seed, step))[:k]
                    for i, key in enumerate(batch_keys):
                        warmup_score[key] = s[i].item()
                else:
                    h = torch.tensor([warmup_score[key] for key in batch_keys], dtype=torch.float64)
                    d = (h - h.mean()) - (s - s.mean())
                    sel = torch.topk(d, k).indices
            picked.append(batch[sel].tolist())
            zi, zt = model(x[batch][sel], y[batch][sel])
            clip_loss_per_sample(zi, zt, 10.0).mean().backward()
            opt.step()
            step += 1
    return picked


def _hook_loop(warmup_point, epochs, b, rate, seed):
    x, y = _toy_data()
    torch.manual_seed(0)
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hook = SelectionHook("dissect", rate, seed=seed, warmup_epochs=warmup_point)
    hook.setup(len(x), "cpu")
    picked, step = [], 0
    for epoch in range(epochs):
        for batch in _batches(len(x), b, epoch):
            def scorer(batch=batch):
                with torch.no_grad():
                    return PairEmbeddings(*model(x[batch], y[batch]), torch.tensor(10.0))

            keep = hook.prepare({"sample_idx": batch}, StepContext(epoch, step, Dist(), scorer))
            picked.append(batch[keep].tolist())
            opt.zero_grad()
            zi, zt = model(x[batch][keep], y[batch][keep])
            clip_loss_per_sample(zi, zt, 10.0).mean().backward()
            opt.step()
            step += 1
        hook.on_pass_end(epoch, Dist())
    return picked


@pytest.mark.parametrize("warmup_point", [1, 2])
def test_matches_literal_port_of_official_loop(warmup_point):
    ours = _hook_loop(warmup_point, epochs=4, b=12, rate=0.5, seed=7)
    official = _official_port(warmup_point, epochs=4, b=12, rate=0.5, seed=7)
    assert len(ours) == len(official) == 16
    assert [sorted(p) for p in ours] == [sorted(p) for p in official]
