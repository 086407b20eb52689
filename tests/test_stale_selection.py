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
    _train_visit(hook, [0, 1, 2, 3], cosines=[0.2, 0.4, 0.6, 0.8], epoch=0, step=0)  # h <- s in the warm-up
    _train_visit(hook, [0, 1, 2], cosines=[0.1, 0.7, 0.65], epoch=1, step=1)  # after warm-up: s changes, h stays
    h = hook.bank.hist[:4]
    s = 100 * hook.last_visit[:4].float().clamp(min=0)
    torch.testing.assert_close(h, 100 * torch.tensor([0.2, 0.4, 0.6, 0.8]).half().float())
    d = h - s  # [+10, -30, -5, 0]
    assert d.argsort(descending=True)[:2].tolist() == [0, 3]
    assert _keep(hook, [0, 1, 2, 3], epoch=1, step=2) == [0, 3]
    # a pair first trained after the warm-up: its first score becomes h, later visits leave h alone
    _train_visit(hook, [4], cosines=[0.3], epoch=1, step=2)
    _train_visit(hook, [4], cosines=[0.5], epoch=2, step=3)
    assert bool(hook.bank.seen[4]) and float(hook.bank.hist[4]) == pytest.approx(30.0, abs=0.05)


def test_exploration_draws_round_e_k_from_the_rejected_reproducibly():
    cos = torch.linspace(-0.9, 0.9, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    def explored(step):
        hook = _hook("clipscore", n=16, exploration=0.5)  # k = 8: 4 by score, 4 at random from the other 12
        _train_visit(hook, list(range(16)), cosines=cos.tolist(), step=step - 1)
        keep = hook.prepare({"sample_idx": torch.arange(16)}, _no_scoring(1, step))
        return keep.tolist()

    top4 = set(cos.argsort(descending=True)[:4].tolist())
    first = explored(7)
    assert len(first) == 8 and len(set(first)) == 8
    assert set(first[:4]) == top4 and not set(first[4:]) & top4
    assert explored(7) == first  # a pure function of (seed, step, rank)
    assert {tuple(sorted(explored(s)[4:])) for s in range(1, 9)} != {tuple(sorted(first[4:]))}
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


# ----------------------------------------------------------------------------- lagged view, in-sampler
def test_lagged_view_is_the_state_as_of_step_b_minus_l_in_both_paths():
    from hf_mmsel.state import SelectionLagError

    g = torch.Generator().manual_seed(1)
    visits = [(list(range(4 * t, 4 * t + 4)), (torch.rand(4, generator=g) * 2 - 1).tolist()) for t in range(4)]
    trainer_side, sampler_side = (_hook("clipscore", n=16, lag=3) for _ in range(2))
    reference = _hook("clipscore", n=16, lag=1)  # commits every record at once
    for t, (idx, cos) in enumerate(visits):  # the trainer has trained steps 0..3 when it selects step 4
        _train_visit(trainer_side, idx, cosines=cos, step=t)
    for t, (idx, cos) in enumerate(visits[:2]):  # the sampler runs 2 batches ahead: steps 0..1 trained
        _train_visit(sampler_side, idx, cosines=cos, step=t)
    for t, (idx, cos) in enumerate(visits[:2]):  # the state as of step 4 - 3 = 1, with no lag at all
        _train_visit(reference, idx, cosines=cos, step=t)
    from hf_mmsel.selection import Candidates

    candidates = torch.tensor([0, 1, 2, 5, 6, 9, 13, 14])  # 9, 13, 14: trained after step 1 -> "never" at lag 3
    before = sampler_side.last_visit.clone()
    a = trainer_side.prepare({"sample_idx": candidates}, _no_scoring(0, 4))
    b = sampler_side.select_candidates(candidates, 4, 0)
    c = reference._stale_keep(Candidates(sample_idx=candidates, epoch=0), 4)[1]  # steps 0..1, step 4's draw
    assert a.tolist() == b.tolist() == c.tolist()
    assert {9, 13, 14} <= set(candidates[a].tolist())
    torch.testing.assert_close(sampler_side.last_visit, before, equal_nan=True)  # the view was undone
    with pytest.raises(SelectionLagError, match="selection_lag"):
        sampler_side.select_candidates(candidates, 5, 0)  # needs step 2, not trained yet


def _counting_dataset(tokenizer, counter, n=64):
    from test_contrastive_trainer import _dataset

    columns = _dataset(tokenizer, n).with_format(None).to_dict()

    def transform(batch):  # "decode": runs for every row the DataLoader reads
        counter.extend(batch["sample_idx"])
        return {k: torch.tensor(v) for k, v in batch.items()}

    from datasets import Dataset

    return Dataset.from_dict(columns).with_transform(transform)


def _run(out, counter=None, **kw):
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer
    from test_contrastive_trainer import _bundle

    bundle = _bundle()
    rec = _Recorder()
    counter = [] if counter is None else counter
    trainer = ContrastiveTrainer(bundle.model, _args(out, **{"num_train_epochs": 3, **STALE, **kw}),
                                 train_dataset=_counting_dataset(bundle.tokenizer, counter),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), hooks=[rec])
    trainer.train()
    return trainer, rec


def test_in_sampler_decodes_only_kept_pairs_and_selects_as_the_trainer_does(tmp_path):
    decoded_trainer, decoded_sampler = [], []
    ref, ref_rec = _run(tmp_path / "t", decoded_trainer, selection_lag=6)
    smp, smp_rec = _run(tmp_path / "s", decoded_sampler, selection_lag=6, selection_in_sampler=True)
    assert smp_rec.kept == ref_rec.kept and all(len(k) == 8 for k in smp_rec.kept)
    assert len(decoded_trainer) == 12 * 16 and len(decoded_sampler) == 12 * 8  # B = 16 candidates, k = 8 kept
    assert sorted(decoded_sampler) == sorted(i for kept in smp_rec.kept for i in kept)
    assert smp.runner.scoring_forwards == 0
    for key, value in ref.runner.state.arrays.items():
        torch.testing.assert_close(smp.runner.state.arrays[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    # 2 DataLoader workers prefetching 2 batches each: the same selections (the lag covers the read-ahead)
    _, workers_rec = _run(tmp_path / "w", selection_lag=6, selection_in_sampler=True, dataloader_num_workers=2)
    assert workers_rec.kept == ref_rec.kept
    with pytest.raises(ValueError, match=r"selection_lag=5 is shorter than the DataLoader runs ahead.*= 6"):
        _args(tmp_path, **STALE, selection_in_sampler=True, selection_lag=5, dataloader_num_workers=2)
    with pytest.raises(ValueError, match="needs selection_score_source='last_visit'"):
        _args(tmp_path, selection_in_sampler=True)


@pytest.mark.parametrize("in_sampler", [False, True])
def test_lagged_resume_is_exact_with_the_pending_records_checkpointed(tmp_path, in_sampler):
    from hf_mmsel.state import read_index

    kw = dict(num_train_epochs=4, save_strategy="steps", save_steps=6, selection_lag=4,
              selection_in_sampler=in_sampler)
    full, full_rec = _run(tmp_path / "a", **kw)
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer
    from test_contrastive_trainer import _bundle

    def trainer(rec, stop=None):
        bundle = _bundle()
        t = ContrastiveTrainer(bundle.model, _args(tmp_path / "b", **{**STALE, **kw}),
                               train_dataset=_counting_dataset(bundle.tokenizer, []),
                               data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), hooks=[rec])
        if stop:
            t.add_callback(StopAtStep(stop))
        return t

    first_rec, resumed_rec = _Recorder(), _Recorder()
    trainer(first_rec, stop=10).train()
    ckpt = tmp_path / "b" / "checkpoint-6"
    assert read_index(ckpt)["settings"]["selection_lag"] == 4
    resumed = trainer(resumed_rec)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert first_rec.kept[:6] + resumed_rec.kept == full_rec.kept
    for key, value in full.runner.state.arrays.items():
        torch.testing.assert_close(resumed.runner.state.arrays[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_lagged_records_round_trip_and_reshard_merge():
    from hf_mmsel.state import LaggedRecords, SampleOwnership

    ranks = [LaggedRecords(), LaggedRecords()]  # 2 old ranks (modulo ownership), 3 steps each
    for t in range(3):
        for r, fifo in enumerate(ranks):
            idx = torch.tensor([2 * (2 * t) + r, 2 * (2 * t + 1) + r])
            fifo.push(t, 0, idx, idx.half() / 10)
    assert [r.step for r in ranks[0].pop_through(0)] == [0] and len(ranks[0].pending) == 2
    with pytest.raises(ValueError, match="step order"):
        ranks[0].push(1, 0, torch.tensor([0]), torch.tensor([0.0]).half())
    one = LaggedRecords.merged([f.state_dict() for f in ranks], SampleOwnership(16, 1, 0))
    assert [r.step for r in one.pending] == [0, 1, 2] and one.trained_through == 2
    assert one.pending[0].sample_idx.tolist() == [1, 3]  # rank 0's step 0 was committed before the save
    assert sorted(one.pending[1].sample_idx.tolist()) == [4, 5, 6, 7]
    assert torch.equal(one.pending[2].value, one.pending[2].sample_idx.half() / 10)
    half = LaggedRecords.merged([f.state_dict() for f in ranks], SampleOwnership(16, 2, 1))
    assert all(bool((r.sample_idx % 2 == 1).all()) for r in half.pending)


@pytest.mark.slow
def test_two_process_stale_selection_same_k_same_selections_in_sampler_and_trainer(tmp_path):
    import json
    from pathlib import Path

    from _helpers import accelerate_launch, run_checked

    run_checked(accelerate_launch(2) + [str(Path(__file__).with_name("stale_dist_worker.py")), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(ranks):
        trainer_path, sampler_path = res["False"], res["True"]
        assert trainer_path["kept"] == sampler_path["kept"] and len(trainer_path["kept"]) == 12
        assert all(len(k) == 4 and all(i % 2 == rank for i in k) for k in trainer_path["kept"])  # k = 4, owned
        assert trainer_path["scoring_forwards"] == sampler_path["scoring_forwards"] == 0
    for key in ("last_visit", "hist"):  # the gathered shards: one state, equal on both ranks and in both paths
        values = [torch.tensor(r[p][key]) for r in ranks for p in ("False", "True")]
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=0, atol=0, equal_nan=True, msg=key)
        assert int((~torch.isnan(values[0])).sum()) > 32 if key == "last_visit" else True


def test_resume_with_another_batch_size_commits_the_pending_records(tmp_path):
    from test_contrastive_trainer import _StateAtTrainBegin

    kw = dict(num_train_epochs=3, save_strategy="steps", save_steps=6, selection_lag=4, selection_in_sampler=True)
    _, rec = _run(tmp_path, **kw)
    trained_by_6 = {i for kept in rec.kept[:6] for i in kept}
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer
    from test_contrastive_trainer import _bundle

    bundle = _bundle()
    resumed_rec = _Recorder()
    resumed = ContrastiveTrainer(bundle.model, _args(tmp_path, **{**STALE, **kw, "per_device_train_batch_size": 8}),
                                 train_dataset=_counting_dataset(bundle.tokenizer, []),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), hooks=[resumed_rec])
    probe = _StateAtTrainBegin(resumed)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))  # 8 batches per pass now, not 4
    recorded = torch.nonzero(~torch.isnan(probe.arrays["0.last_visit"].float())).flatten().tolist()
    assert set(recorded) == trained_by_6  # the 3 pending records (steps 3..5) were committed, none lost
    assert resumed_rec.kept and all(len(k) == 4 for k in resumed_rec.kept)
