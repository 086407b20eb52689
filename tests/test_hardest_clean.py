"""``hardest_clean`` (alias ``recommended``, issue 15): a per-batch GMM clean pool, then its lowest scores."""

from __future__ import annotations

import torch

from hf_mmsel.gsc.gmm import fit_two_gaussians, high_mean_posterior
from hf_mmsel.selection import SELECTION_STRATEGIES, HardestClean, build_strategy, hardest_clean_criterion, top_k


def _by_hand(scores: torch.Tensor, k: int) -> list[int]:
    """The rule as written in the module docstring, literally."""
    x = scores.double()
    x = (x - x.min()) / (x.max() - x.min())
    post = high_mean_posterior(x, fit_two_gaussians(x), monotone=True)
    pool = [i for i in range(len(scores)) if post[i] > 0.5]
    rest = [i for i in range(len(scores)) if post[i] <= 0.5]
    pool.sort(key=lambda i: float(scores[i]))  # hardest (lowest s) first
    rest.sort(key=lambda i: -float(scores[i]))  # most clean-looking first
    return sorted((pool + rest)[:k])


def test_keeps_the_lowest_scores_of_the_clean_pool():
    s = torch.tensor([90.0, 85, 80, 75, 70, 20, 15, 10, 5, 0])
    crit = hardest_clean_criterion(s)
    assert sorted(top_k(crit, 3).tolist()) == [2, 3, 4] == _by_hand(s, 3)  # clean pool 0..4, its 3 hardest
    assert sorted(top_k(crit, 7).tolist()) == [0, 1, 2, 3, 4, 5, 6] == _by_hand(s, 7)  # pool + best of the rest
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random bimodal batches: identical to the literal rule
        s = torch.cat([60 + 10 * torch.randn(40, generator=g), 20 + 10 * torch.randn(24, generator=g)])
        for k in (16, 32, 48):
            assert sorted(top_k(hardest_clean_criterion(s), k).tolist()) == _by_hand(s, k)


def test_all_equal_scores_fall_back_to_clipscore_order():
    s = torch.full((8,), 42.0)
    assert torch.equal(hardest_clean_criterion(s), s)


def test_registered_under_its_name_and_the_recommended_alias():
    assert SELECTION_STRATEGIES["hardest_clean"] is HardestClean is SELECTION_STRATEGIES["recommended"]
    strategy = build_strategy("recommended")
    assert isinstance(strategy, HardestClean) and strategy.requires == "clip_score"


# ------------------------------------------------------------------------------------------ trainer
from test_contrastive_trainer import _Recorder, _trainer  # noqa: E402


def test_trainer_recommended_with_gsc_and_with_stale_scores(tmp_out):
    rec = _Recorder()
    trainer = _trainer(tmp_out, hooks=[rec], num_train_epochs=2, selection_strategy="recommended", gsc=True)
    trainer.train()
    assert all(len(kept) == 8 for kept in rec.kept) and trainer.runner.scoring_forwards > 0
    stale = _trainer(tmp_out / "stale", num_train_epochs=2, selection_strategy="recommended",
                     selection_score_source="last_visit", selection_exploration=0.25)
    stale.train()
    assert stale.runner.scoring_forwards == 0
