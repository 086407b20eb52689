"""Stale (last-visit) selection scores and exploration (issue 9 item 1): no scoring forward, selections follow
the stored scores, reproducible exploration, exact resume inside ContrastiveTrainer (with GSC)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mmsel.hooks import Dist, StepContext
from hf_mmsel.selection import SelectionHook, selection_generator, top_k


def _no_scoring(epoch, step):
    def scorer():
        raise AssertionError("last_visit must never run the scoring forward")

    return StepContext(epoch=epoch, step=step, dist=Dist(), scorer=scorer)


def _pairs(cosines):
    """Unit embeddings with the given positive-pair cosines cos(v_i, u_i)."""
    cos = torch.tensor(cosines, dtype=torch.float32)
    v = torch.zeros(len(cosines), 2)
    v[:, 0] = 1.0
    u = torch.stack([cos, torch.sqrt(1 - cos**2)], dim=1)
    return v, u


def _train_visit(hook, idx, cosines=None, losses=None, epoch=0, step=0):
    """What ContrastiveTrainer does after the loss of a step: the hook chain's loss_terms on the kept pairs."""
    n = len(idx)
    v, u = _pairs(cosines if cosines is not None else [0.0] * n)
    loss = torch.tensor(losses if losses is not None else [0.0] * n)
    terms = hook.loss_terms(v, u, torch.tensor(10.0), torch.tensor(idx), loss, _no_scoring(epoch, step))
    assert terms.weights is None and terms.extra_loss is None


def _hook(strategy, rate=0.5, n=16, **kw):
    hook = SelectionHook(strategy, rate, seed=3, score_source="last_visit", **kw)
    hook.setup(n, "cpu")
    return hook


def _keep(hook, idx, epoch=0, step=0):
    return sorted(torch.tensor(idx)[hook.prepare({"sample_idx": torch.tensor(idx)}, _no_scoring(epoch, step))].tolist())


def test_clipscore_follows_stored_cosines_and_never_trained_pairs_come_first():
    hook = _hook("clipscore", n=8)
    _train_visit(hook, [0, 1, 2], cosines=[0.1, 0.9, 0.5])
    assert _keep(hook, [0, 1, 2, 3]) == [1, 3]  # 3 never trained: first; then the largest stored cos
    _train_visit(hook, [3, 1], cosines=[0.95, -0.2], step=1)
    assert _keep(hook, [0, 1, 2, 3], step=2) == [2, 3]  # 1's new cos is the smallest
    assert hook.last_visit.dtype == torch.float16 and math.isnan(float(hook.last_visit[7]))
    assert hook.state_dict()["last_visit"].shape == (8,)


def test_small_loss_keeps_the_smallest_stale_losses():
    hook = _hook("small_loss", n=8)
    _train_visit(hook, [0, 1, 2, 3], losses=[2.0, 0.5, 1.0, 3.0])
    assert _keep(hook, [0, 1, 2, 3]) == [1, 2]
    torch.testing.assert_close(hook.last_visit[:4].float(), torch.tensor([2.0, 0.5, 1.0, 3.0]))


def test_dissect_h_from_warmup_visits_then_h_minus_stale_s():
    hook = _hook("dissect", n=8, warmup_epochs=1)
    assert hook.strategy.name == "dissect"
    assert len(_keep(hook, [0, 1, 2, 3], epoch=0)) == 2  # warm-up: random, no scoring forward
    _train_visit(hook, [0, 1, 2, 3], cosines=[0.2, 0.4, 0.6, 0.8], epoch=0)  # h <- s at every warm-up visit
    _train_visit(hook, [0, 1, 2], cosines=[0.1, 0.7, 0.65], epoch=1)  # after warm-up: s changes, h stays
    h = hook.bank.hist[:4]
    s = 100 * hook.last_visit[:4].float().clamp(min=0)
    torch.testing.assert_close(h, 100 * torch.tensor([0.2, 0.4, 0.6, 0.8]).half().float())
    d = h - s  # [+10, -30, -5, 0]
    assert d.argsort(descending=True)[:2].tolist() == [0, 3]
    assert _keep(hook, [0, 1, 2, 3], epoch=1, step=5) == [0, 3]
    # a pair first trained after the warm-up: its first score becomes h, later visits leave h alone
    _train_visit(hook, [4], cosines=[0.3], epoch=1)
    _train_visit(hook, [4], cosines=[0.5], epoch=2)
    assert bool(hook.bank.seen[4]) and float(hook.bank.hist[4]) == pytest.approx(30.0, abs=0.05)


def test_exploration_draws_round_e_k_from_the_rejected_reproducibly():
    cos = torch.linspace(-0.9, 0.9, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    def explored(step):
        hook = _hook("clipscore", n=16, exploration=0.5)  # k = 8: 4 by score, 4 at random from the other 12
        _train_visit(hook, list(range(16)), cosines=cos.tolist())
        keep = hook.prepare({"sample_idx": torch.arange(16)}, _no_scoring(1, step))
        return keep.tolist()

    top4 = set(cos.argsort(descending=True)[:4].tolist())
    first = explored(7)
    assert len(first) == 8 and len(set(first)) == 8
    assert set(first[:4]) == top4 and not set(first[4:]) & top4
    assert explored(7) == first  # a pure function of (seed, step, rank)
    assert {tuple(sorted(explored(s)[4:])) for s in range(8)} != {tuple(sorted(first[4:]))}
    # the draw is the one from selection_generator(seed, step, rank) after the random tie-breaking permutation
    g = selection_generator(3, 7, 0)
    top = top_k(100 * cos.half().float().clamp(min=0), 4, g)
    rest = torch.tensor(sorted(set(range(16)) - set(top.tolist())))
    assert first[4:] == rest[torch.randperm(12, generator=g)[:4]].tolist()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="runs none|uses none"):
        SelectionHook("random", 0.5, score_source="last_visit")
    with pytest.raises(ValueError, match="score source"):
        SelectionHook("dissect", 0.5, score_source="stale")
    with pytest.raises(ValueError, match=r"selection_exploration must be in \[0, 1\)"):
        SelectionHook("clipscore", 0.5, exploration=1.0)


# ------------------------------------------------------------------------------------------ trainer
from _callbacks import StopAtStep  # noqa: E402
from test_contrastive_trainer import _Recorder, _args, _trainer  # noqa: E402

STALE = dict(selection_strategy="dissect", selection_score_source="last_visit", selection_exploration=0.25,
             gsc=True, selection_warmup_epochs=1)


def test_trainer_last_visit_runs_no_scoring_forward_and_records_every_trained_pair(tmp_out):
    rec = _Recorder()
    trainer = _trainer(tmp_out, hooks=[rec], num_train_epochs=3, **STALE)
    trainer.train()
    assert trainer.runner.scoring_forwards == 0
    trained = sorted({i for kept in rec.kept for i in kept})
    recorded = torch.nonzero(~torch.isnan(trainer.selection_hook.last_visit.float())).flatten().tolist()
    assert recorded == trained and bool(trainer.selection_hook.bank.seen[trained].all())
    assert all(len(kept) == 8 for kept in rec.kept)
    fresh = _trainer(tmp_out / "fresh", num_train_epochs=3, selection_strategy="dissect", gsc=True,
                     selection_warmup_epochs=1)
    fresh.train()
    assert fresh.runner.scoring_forwards == 12  # one per candidate batch from the snapshot pass on
    with pytest.raises(ValueError, match="runs none"):
        _args(tmp_out, selection_strategy="random", selection_score_source="last_visit")


def test_trainer_last_visit_resume_is_exact(tmp_path):
    kw = dict(num_train_epochs=4, save_strategy="steps", save_steps=6, **STALE)
    full_rec = _Recorder()
    full = _trainer(tmp_path / "a", hooks=[full_rec], **kw)
    full.train()
    first_rec = _Recorder()
    first = _trainer(tmp_path / "b", hooks=[first_rec], **kw)
    first.add_callback(StopAtStep(10))
    first.train()
    resumed_rec = _Recorder()
    resumed = _trainer(tmp_path / "b", hooks=[resumed_rec], **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert first_rec.kept[:6] + resumed_rec.kept == full_rec.kept
    a, b = full.runner.state.arrays, resumed.runner.state.arrays
    assert "0.last_visit" in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="selection_score_source=last_visit"):
        _trainer(tmp_path / "b", num_train_epochs=4, selection_strategy="dissect", gsc=True,
                 selection_warmup_epochs=1).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
