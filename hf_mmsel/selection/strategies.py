"""Online selection strategies (docs/design.md, DISSect §2-3): each maps a candidate batch to a per-pair *keep
criterion*.

A strategy returns, for the ``B`` candidates of one rank, a criterion ``c[B]`` ("larger = keep") or ``None``
(uniformly random pick); :func:`top_k` keeps the ``k`` largest. Scores follow the official code: the CLIPScore
``s = 100 * max(cos(v, u), 0)`` of the current model (no-grad forward), the historical score ``h`` from the
:class:`~hf_mmsel.selection.bank.ScoreBank`, and the differential ``d = h - s`` (its batch-mean centring in the
official code is a ranking no-op, docs/design.md, DISSect §2a).

=======================  ====================================================  ==============================
name                     criterion (keep the k largest)                        scoring forward
=======================  ====================================================  ==============================
``dissect`` (default)    epochs < W: random; then ``h - s`` with ``h`` = score  epochs W-1 (snapshot) and >= W
                         on the last visit in warm-up epoch W-1
``dissect_ema``          ``h - s``, ``h = EMA_beta`` of past scores, first      every epoch
                         visit ``h = fallback``; random tie-breaking
``random``               none (uniform k-subset)                               never
``small_loss``           ``-l_i`` (per-pair training loss, local rows x global  every epoch
                         cols: InfoNCE, or SigLIP's sigmoid row)
``big_loss``             ``l_i``                                               every epoch
``clipscore``            ``100 * cos`` of the current model                    every epoch
``reference_clipscore``  a fixed reference model's score (oracle baseline)     never (precomputed table)
``full``                 no selection (all B pairs)                            never
=======================  ====================================================  ==============================

``learnability``, ``hard_learnability`` and ``easy_reference`` (a frozen reference model's per-batch loss, and
JEST's joint sampling) are registered by :mod:`hf_mmsel.selection.learnability`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..state import StateNamespace
from .bank import ScoreBank

__all__ = [
    "SELECTION_STRATEGIES",
    "Candidates",
    "ScoreBankStrategy",
    "SelectionStrategy",
    "build_strategy",
    "top_k",
]


@dataclass
class Candidates:
    """One rank's candidate batch as the strategies see it (scores are ``None`` when not computed)."""

    sample_idx: torch.Tensor  # [B] long
    epoch: int
    clip_scores: torch.Tensor | None = None  # [B] s = 100*max(cos, 0), float32
    cosine: torch.Tensor | None = None  # [B] raw cos, float32
    losses: torch.Tensor | None = None  # [B] per-pair training loss (InfoNCE or sigmoid; local rows vs gathered columns)
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific (e.g. a reference model's losses)


def top_k(criterion: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the ``k`` largest entries; with a ``generator`` exact ties are broken uniformly at random
    (a random permutation followed by a stable sort, so distinct values keep their exact order)."""
    if generator is None:
        return torch.topk(criterion, k).indices
    perm = torch.randperm(criterion.numel(), generator=generator).to(criterion.device)
    order = torch.sort(criterion[perm], descending=True, stable=True).indices[:k]
    return perm[order]


class SelectionStrategy:
    """Base class: ``criterion`` (``None`` = random) plus the strategy's own per-sample state.

    A strategy that keeps per-sample state allocates it in :meth:`setup` (e.g. DISSect's :class:`ScoreBank`) and
    declares the arrays it writes in :meth:`state_arrays`; :class:`~hf_mmsel.selection.SelectionHook` checkpoints
    them with the rest of its namespace and snapshots them for its lagged view. The hook tells the strategy about
    scores through :meth:`before_scored_criterion` (fresh scores, before the criterion), :meth:`record_scores`
    (fresh scores, after the selection) and :meth:`record_training_visit` (stale scores of a training forward).
    """

    name: ClassVar[str]
    requires: ClassVar[str] = "none"  # "none" | "clip_score" | "loss"
    random_ties: ClassVar[bool] = False
    selects: ClassVar[bool] = True  # False: keep every candidate
    needs_reference: ClassVar[bool] = False  # True: needs a frozen reference model (learnability.py)
    bank: ScoreBank | None = None  # the per-sample score table of the strategies that keep one (DISSect)

    def setup(self, storage: StateNamespace) -> None:
        """Allocate this strategy's per-sample arrays in ``storage`` (the selection hook's namespace)."""

    def state_arrays(self) -> list[torch.Tensor]:
        """The per-sample arrays this strategy writes (snapshotted around a lagged read)."""
        return []

    def needs_scoring(self, epoch: int) -> bool:
        """Whether this epoch needs the no-grad scoring forward of the current model."""
        return self.requires != "none"

    def criterion(self, cand: Candidates, bank: ScoreBank | None) -> torch.Tensor | None:
        return None

    def extend_candidates(self, cand: Candidates, batch, ctx) -> None:
        """Per-step inputs beyond the learner's scores (into ``cand.extra``), e.g. a reference model's forward."""

    def select(self, crit: torch.Tensor, k: int, cand: Candidates, generator: torch.Generator, ctx=None) -> torch.Tensor:
        """The ``k`` kept indices given the criterion (default: top-k; JEST's joint sampling overrides it)."""
        return top_k(crit, k, generator if self.random_ties else None)

    def before_scored_criterion(self, cand: Candidates) -> None:
        """State writes needed before this batch's criterion (candidates with fresh scores only)."""

    def record_scores(self, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        """This rank's (owned) fresh ``(sample_idx, s)`` of this step, after the selection."""

    def record_training_visit(self, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        """``selection_score_source="last_visit"``: the scores ``s`` of the kept pairs' training forward (the only
        scores there are; nothing is written at selection time)."""


class ScoreBankStrategy(SelectionStrategy):
    """A strategy with DISSect's per-sample historical score ``h`` (:class:`ScoreBank`, 5 B/sample)."""

    def setup(self, storage: StateNamespace) -> None:
        self.bank = ScoreBank(storage=storage.namespace("bank"))

    def state_arrays(self) -> list[torch.Tensor]:
        return [self.bank.hist, self.bank.seen] if self.bank is not None else []

    def before_scored_criterion(self, cand: Candidates) -> None:
        self.before_criterion(self.bank, cand)

    def record_scores(self, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        self.update_bank(self.bank, sample_idx, clip_scores, epoch)

    def record_training_visit(self, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        self.update_bank_last_visit(self.bank, sample_idx, clip_scores, epoch)

    def before_criterion(self, bank: ScoreBank, cand: Candidates) -> None:
        """Bank writes needed before this batch's criterion (scored candidates only)."""

    def update_bank(self, bank: ScoreBank, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        """Update the bank with this rank's (owned) ``(sample_idx, s)`` of this step."""

    def update_bank_last_visit(self, bank: ScoreBank, sample_idx: torch.Tensor, clip_scores: torch.Tensor,
                               epoch: int) -> None:
        """The bank update from a training forward's scores (stale scores). Default: ``update_bank``."""
        self.update_bank(bank, sample_idx, clip_scores, epoch)


class FullData(SelectionStrategy):
    """No selection: train on every candidate (the baseline)."""

    name = "full"
    selects = False


class RandomSelection(SelectionStrategy):
    """Uniform random k-subset of each candidate batch."""

    name = "random"


class SmallLoss(SelectionStrategy):
    """Keep the k pairs with the smallest per-pair training loss (InfoNCE or SigLIP's sigmoid; local rows against
    gathered columns)."""

    name = "small_loss"
    requires = "loss"

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor:
        return -cand.losses


class BigLoss(SelectionStrategy):
    """Keep the k pairs with the largest per-pair training loss."""

    name = "big_loss"
    requires = "loss"

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor:
        return cand.losses


class ClipScore(SelectionStrategy):
    """Keep the k pairs with the largest current-model CLIPScore ``100*cos`` (online, not an oracle)."""

    name = "clipscore"
    requires = "clip_score"

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor:
        return 100.0 * cand.cosine


class ReferenceClipScore(SelectionStrategy):
    """Keep the k pairs with the largest score of a fixed reference model (the paper's oracle baseline).

    ``reference_scores``: ``[N]`` tensor indexed by ``sample_idx`` (e.g. from
    ``ContrastiveTrainer.compute_reference_scores`` or a file); no forward of the trained model is needed.
    """

    name = "reference_clipscore"

    def __init__(self, reference_scores: torch.Tensor | None = None) -> None:
        if reference_scores is None:
            raise ValueError(
                "strategy 'reference_clipscore' needs reference scores: pass reference_scores (a [N] tensor), "
                "a reference_scores_path, or a reference_model to the trainer"
            )
        self.reference_scores = torch.as_tensor(reference_scores, dtype=torch.float32).flatten()

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor:
        if self.reference_scores.device != cand.sample_idx.device:
            self.reference_scores = self.reference_scores.to(cand.sample_idx.device)
        return self.reference_scores[cand.sample_idx]


class DissectWarmup(ScoreBankStrategy):
    """DISSect, warm-up variant (docs/design.md, DISSect §2a; the paper's CC3M script).

    Epochs ``e < W``: random k. The score of each pair on its visit in epoch ``W-1`` is snapshotted as ``h``;
    from epoch ``W`` on keep the top-k of ``d = h - s``. Scoring is skipped in epochs ``0..W-2`` (their scores
    would be overwritten). A pair never scored in the snapshot pass (left out by ``drop_last``) is scored before
    its first selection: its first score becomes its ``h`` (``d = 0``) instead of the official ``h = 0``, which
    would mark it as the least useful pair for the rest of the run. "Epochs" are passes over the pool.
    """

    name = "dissect"
    requires = "clip_score"

    def __init__(self, warmup_epochs: int = 1) -> None:
        if int(warmup_epochs) < 1:
            raise ValueError(
                f"strategy 'dissect' needs selection_warmup_epochs >= 1 (got {warmup_epochs}): with 0 the snapshot "
                "is empty and it degenerates to 'lowest current score'"
            )
        self.warmup_epochs = int(warmup_epochs)

    def needs_scoring(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs - 1

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor | None:
        if cand.epoch < self.warmup_epochs:
            return None
        return bank.lookup(cand.sample_idx, cand.clip_scores) - cand.clip_scores

    def before_criterion(self, bank: ScoreBank, cand: Candidates) -> None:
        if cand.epoch >= self.warmup_epochs:
            unseen = ~bank.is_seen(cand.sample_idx)
            if bool(unseen.any()):
                bank.update(cand.sample_idx[unseen], cand.clip_scores[unseen], mode="overwrite")

    def update_bank(self, bank: ScoreBank, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        if epoch == self.warmup_epochs - 1:
            bank.update(sample_idx, clip_scores, mode="overwrite")

    def update_bank_last_visit(self, bank: ScoreBank, sample_idx: torch.Tensor, clip_scores: torch.Tensor,
                               epoch: int) -> None:
        """Stale scores: ``h <- s`` at every training visit of the warm-up (``h`` = the pair's last warm-up score;
        the warm-up trains only k of B, so pass W-1 alone would leave most pairs without ``h``), and afterwards
        on a pair's first training visit if it has no ``h`` yet."""
        if epoch >= self.warmup_epochs:
            unseen = ~bank.is_seen(sample_idx)
            sample_idx, clip_scores = sample_idx[unseen], clip_scores[unseen]
        if sample_idx.numel():
            bank.update(sample_idx, clip_scores, mode="overwrite")


class DissectEMA(ScoreBankStrategy):
    """DISSect, momentum variant (docs/design.md, DISSect §2b): ``d = h - s`` from epoch 0 with ``h`` the EMA (``beta``)
    of a pair's past scores, then ``h <- beta*h + (1-beta)*s`` (``h <- s`` on the first visit).

    ``first_visit_fallback``: ``"zero"`` (official: ``h = 0``, so epoch 0 keeps the lowest-score pairs) or
    ``"score"`` (``h = s``, ``d = 0``: a random pick among unseen pairs). Ties are broken at random.
    """

    name = "dissect_ema"
    requires = "clip_score"
    random_ties = True
    FALLBACKS = ("zero", "score")

    def __init__(self, ema_beta: float = 0.9, first_visit_fallback: str = "zero") -> None:
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        if first_visit_fallback not in self.FALLBACKS:
            raise ValueError(
                f"unknown first_visit_fallback {first_visit_fallback!r}; choose one of {list(self.FALLBACKS)}"
            )
        self.ema_beta = float(ema_beta)
        self.first_visit_fallback = first_visit_fallback

    def criterion(self, cand: Candidates, bank: ScoreBank) -> torch.Tensor:
        fallback = cand.clip_scores if self.first_visit_fallback == "score" else 0.0
        return bank.lookup(cand.sample_idx, fallback) - cand.clip_scores

    def update_bank(self, bank: ScoreBank, sample_idx: torch.Tensor, clip_scores: torch.Tensor, epoch: int) -> None:
        bank.update(sample_idx, clip_scores, mode="ema", beta=self.ema_beta)


SELECTION_STRATEGIES: dict[str, type[SelectionStrategy]] = {
    cls.name: cls
    for cls in (DissectWarmup, DissectEMA, RandomSelection, SmallLoss, BigLoss, ClipScore, ReferenceClipScore, FullData)
}


def build_strategy(name: str, **options) -> SelectionStrategy:
    """Instantiate strategy ``name``; ``options`` not used by that strategy are ignored.

    Options: ``warmup_epochs`` (dissect), ``ema_beta`` and ``first_visit_fallback`` (dissect_ema),
    ``reference_scores`` (reference_clipscore), ``reference``, ``joint``, ``joint_chunks``, ``joint_temperature``
    (learnability family).
    """
    if name not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown selection strategy {name!r}; choose one of {sorted(SELECTION_STRATEGIES)}")
    cls = SELECTION_STRATEGIES[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and k != "self" and v is not None})
