"""``SelectionHook``: online sample selection as a :class:`~hf_mmsel.hooks.BatchHook` (docs/design.md, DISSect §8).

Each step, on every rank: run the strategy's no-grad scoring forward only when it needs one, compute the keep
criterion, keep ``k = round(r * B)`` pairs (the same k on every rank), then let the strategy record its own
``(sample_idx, s)`` into its state (DISSect: its shard of the :class:`ScoreBank`, created by the strategy's
``setup``): the owner-stable data order puts only owned samples in a rank's batches, so no collective is needed. Ground-truth diagnostics (last score / criterion, scored pass,
``is_noisy``, per-pass histograms) are allocated only with ``diagnostics=True``.
Randomness comes from a generator seeded by ``(seed, step, rank)``, so a resumed run draws exactly what an
uninterrupted run draws.

**Stale scores** (``score_source="last_visit"``, docs/design.md, Scale §D): no scoring forward at all. The current
score of a pair is the one of its last *training* forward, recorded in ``loss_terms`` into one more per-sample
float16 array ``last_visit`` (2 B/sample; the positive-pair cosine ``cos(v_i, u_i)`` for CLIPScore strategies, the
per-pair training loss ``l_i`` for loss strategies). Rules:

* selection is a pure read of the stored state (the bank too: every bank write happens at the training record,
  :meth:`~hf_mmsel.selection.strategies.SelectionStrategy.record_training_visit`), so it can run in the batch
  sampler (``in_sampler``, :class:`~hf_mmsel.selection.SelectingBatchSampler`); the lagged view snapshots
  ``last_visit`` and whatever arrays the strategy declares (``state_arrays``);
* ``lag`` L: candidate batch b is selected from the state as of step b - L (records of batches <= b - L, the
  newest L - 1 wait in :class:`~hf_mmsel.state.LaggedRecords`), in the trainer and in the sampler alike;
* a never-trained pair (``last_visit`` = NaN) ranks above every scored pair (criterion ``+inf``): each pair is
  trained and scored once before its score can reject it; ties are broken at random;
* ``exploration`` e: of the ``k`` kept, ``round(e*k)`` are drawn uniformly from the candidates the criterion did
  not keep (so rejected pairs get re-scored), from the same ``(seed, step, rank)`` generator; same ``k`` on
  every rank. Exploration also applies to fresh scores when set.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch

from ..hooks import BatchHook, Dist, LossTerms, StepContext
from ..state.lagged import LaggedRecords, StepRecord
from ..state import StateNamespace
from .bank import ScoreBank
from .strategies import Candidates, SelectionStrategy, build_strategy, top_k

__all__ = ["SCORE_SOURCES", "SelectionHook", "clip_score", "keep_with_exploration", "num_to_keep",
           "selection_generator"]

_HIST_BINS = 25
SCORE_SOURCES = ("fresh", "last_visit")


def num_to_keep(batch_size: int, select_rate: float) -> int:
    """``k = round(r * B)``, at least 1 (the official ``int(r*B)`` truncates, docs/design.md, DISSect §6)."""
    return max(1, min(batch_size, int(round(select_rate * batch_size))))


def selection_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator for the random draws of candidate batch ``step`` on ``rank``: a pure function of its
    arguments, so resuming at any step reproduces the uninterrupted run's draws."""
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(step)) * 4096 + int(rank)) % (2**63))


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, s)`` per pair with ``s = 100 * max(cos, 0)`` (docs/design.md, DISSect §6); reduced in float32."""
    cos = (image_embeds.float() * text_embeds.float()).sum(-1)
    return cos, 100.0 * cos.clamp(min=0.0)


def keep_with_exploration(criterion: torch.Tensor, k: int, exploration: float = 0.0,
                          generator: torch.Generator | None = None, random_ties: bool = False) -> torch.Tensor:
    """``k`` indices: the ``k - round(e*k)`` largest of ``criterion`` (:func:`top_k`), then ``round(e*k)`` drawn
    uniformly (``generator``) from the rest. ``e = 0``: exactly :func:`top_k`."""
    n_explore = int(round(float(exploration) * k))
    top = top_k(criterion, k - n_explore, generator if random_ties else None)
    if n_explore == 0:
        return top
    rest = torch.ones(criterion.numel(), dtype=torch.bool, device=criterion.device)
    rest[top] = False
    rest = torch.nonzero(rest).flatten()
    pick = rest[torch.randperm(rest.numel(), generator=generator)[:n_explore].to(rest.device)]
    return torch.cat([top, pick])


def _check_rate(select_rate: float) -> float:
    if not (0.0 < float(select_rate) <= 1.0):
        raise ValueError(f"select_rate must be in (0, 1], got {select_rate}")
    return float(select_rate)


class SelectionHook(BatchHook):
    """Keeps ``round(select_rate * B)`` pairs of every candidate batch according to ``strategy``.

    Args:
        strategy: a name of ``SELECTION_STRATEGIES`` or a :class:`SelectionStrategy` instance.
        select_rate: r in (0, 1].
        seed: seed of the per-step selection randomness.
        diagnostics: also keep (sharded, checkpointed) the last CLIPScore and keep criterion of every pair, the
            pass it was last scored in and the ground-truth ``is_noisy`` flag when batches carry it (never used for
            selection), and per-pass score histograms; off by default (17 B/sample more).
        score_source: ``"fresh"`` (the paper's: a no-grad scoring forward of the current model on the B
            candidates) or ``"last_visit"`` (stale scores from the last training forward; see the module docstring).
        exploration: e in [0, 1): share of k drawn at random from the candidates the criterion did not keep.
        lag: L >= 1 (``last_visit``): the selection of candidate batch b reads the state as of step b - L (the
            training records of batches <= b - L); L = 1 is the newest state.
        in_sampler: the batch sampler selects (:meth:`select_candidates`); :meth:`prepare` keeps every pair.
        strategy_options: forwarded to :func:`build_strategy` (``warmup_epochs``, ``ema_beta``, ...).
    """

    state_kind = "selection"

    def __init__(
        self, strategy: str | SelectionStrategy = "dissect", select_rate: float = 0.5, *, seed: int = 0,
        diagnostics: bool = False, score_source: str = "fresh", exploration: float = 0.0, lag: int = 1,
        in_sampler: bool = False, **strategy_options,
    ) -> None:
        self.select_rate = _check_rate(select_rate)
        self.strategy = strategy if isinstance(strategy, SelectionStrategy) else build_strategy(strategy, **strategy_options)
        if score_source not in SCORE_SOURCES:
            raise ValueError(f"unknown selection score source {score_source!r}; choose one of {list(SCORE_SOURCES)}")
        if score_source == "last_visit" and self.strategy.requires not in ("clip_score", "loss"):
            raise ValueError(
                f"selection_score_source='last_visit' replaces a scoring forward, but strategy "
                f"{self.strategy.name!r} uses none (requires={self.strategy.requires!r}); use 'fresh'"
            )
        if score_source == "last_visit" and self.strategy.needs_reference:
            raise ValueError(
                f"strategy {self.strategy.name!r} needs a reference model's forward on every candidate batch, so "
                "stale (last_visit) scores save nothing: use selection_score_source='fresh'"
            )
        if not 0.0 <= float(exploration) < 1.0:
            raise ValueError(f"selection_exploration must be in [0, 1), got {exploration}")
        if float(exploration) > 0 and type(self.strategy).select is not SelectionStrategy.select:
            raise ValueError(f"selection_exploration draws part of k at random; it does not combine with the "
                             f"{self.strategy.name!r} strategy's own sampling (e.g. JEST joint selection)")
        self.score_source, self.exploration = score_source, float(exploration)
        if int(lag) < 1:
            raise ValueError(f"selection_lag must be >= 1, got {lag}")
        if in_sampler and score_source != "last_visit":
            raise ValueError("selection_in_sampler=True needs selection_score_source='last_visit' (a fresh score "
                             "needs the images, which the sampler never loads)")
        self.lag, self.in_sampler = int(lag), bool(in_sampler)
        self.records = LaggedRecords()
        self.seed = int(seed)
        self.diagnostics = bool(diagnostics)
        self.epoch_histograms: list[torch.Tensor] = []  # per finished pass: [2 (clean, noisy), bins]
        self.histogram_epochs: list[int] = []

    # ----------------------------------------------------------------------------------------------- state
    def setup(self, num_samples: int, device: torch.device | str = "cpu", storage: StateNamespace | None = None) -> None:
        storage = self.use_storage(num_samples, device, storage)
        self.strategy.setup(storage)  # the strategy's own arrays (DISSect: its ScoreBank under "bank.")
        # stale scores: cos (CLIPScore strategies) or l (loss strategies) of the last training forward; NaN = never
        self.last_visit = (storage.add("last_visit", torch.float16, float("nan")) if self.stale else None)
        self.records = LaggedRecords()
        if self.diagnostics:
            self.last_score = storage.add("last_score", torch.float32, float("nan"))
            self.last_criterion = storage.add("last_criterion", torch.float32, float("nan"))
            self.scored_epoch = storage.add("scored_epoch", torch.int32, -1)
            self.noisy = storage.add("noisy", torch.int8, -1)  # -1 unknown, 0 clean, 1 noisy
        else:
            self.last_score = self.last_criterion = self.scored_epoch = self.noisy = None

    @property
    def bank(self) -> ScoreBank | None:
        """The strategy's :class:`ScoreBank` (DISSect), else None."""
        return self.strategy.bank

    @property
    def stale(self) -> bool:
        """Whether scores come from the last training visit (``score_source="last_visit"``)."""
        return self.score_source == "last_visit"

    @property
    def device(self) -> torch.device:
        return self._require_setup().device

    @property
    def _storage(self) -> StateNamespace | None:  # deprecated name of ``storage``
        return self.storage

    def _require_setup(self) -> StateNamespace:
        if self.storage is None:
            raise RuntimeError("SelectionHook.setup(num_samples, device) must be called before the first step")
        return self.storage

    def replicated_state_dict(self) -> dict[str, torch.Tensor]:
        """With diagnostics, the per-pass score histograms (the per-sample arrays live in ``storage``)."""
        self._require_setup()
        if not self.diagnostics:
            return {}
        return {"histogram_epochs": torch.tensor(self.histogram_epochs, dtype=torch.long),
                "epoch_histograms": (torch.stack(self.epoch_histograms) if self.epoch_histograms
                                     else torch.zeros(0, 2, _HIST_BINS))}

    def load_replicated_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._require_setup()
        if self.diagnostics:
            self.histogram_epochs = [int(e) for e in state["histogram_epochs"]]
            self.epoch_histograms = list(state["epoch_histograms"].unbind(0))

    def rank_state_dict(self) -> dict[str, torch.Tensor]:
        """Per-rank state that is not per sample: the pending (not yet committed) training records."""
        return self.records.state_dict() if self.stale else {}

    def load_rank_state_dicts(self, states: list[Mapping[str, torch.Tensor]], exact: bool = True,
                              step: int | None = None) -> None:
        """Restore the pending records. After a world-size or batch-size change (``exact=False``; the data order
        changes anyway) the owned records of every old rank are committed at once and the lag restarts at the
        candidate-batch counter ``step``."""
        if not self.stale:
            return
        records = LaggedRecords.merged(states, self.storage.ownership)
        if not exact:
            for record in records.pending:
                self._apply_record(record)
            records = LaggedRecords()
            records.trained_through = (int(step) - 1) if step is not None else -1
        self.records = records

    # ------------------------------------------------------------------------------------------------ step
    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        storage = self._require_setup()
        device = storage.device
        sample_idx = batch["sample_idx"].to(device).long()
        size = sample_idx.shape[0]
        strategy = self.strategy
        cand = Candidates(sample_idx=sample_idx, epoch=ctx.epoch)
        if self.in_sampler:  # the batch sampler kept these pairs already (select_candidates)
            self._record(batch, cand, None, None, ctx)
            return None
        if self.stale:
            with self._lagged_view(ctx.step):
                crit, keep = self._stale_keep(cand, ctx.step)
            self._record(batch, cand, crit, keep, ctx)
            return keep
        if strategy.selects and strategy.needs_scoring(ctx.epoch):
            emb = ctx.score()
            cand.cosine, cand.clip_scores = (t.to(device) for t in clip_score(emb.image_embeds, emb.text_embeds))
            if strategy.requires == "loss":  # the training loss per pair: InfoNCE or SigLIP's sigmoid (ctx.loss)
                cand.losses = ctx.loss.detached().per_sample(
                    emb.image_embeds.float(), emb.text_embeds.float(), emb.logit_scale.float(),
                    gather_fn=ctx.dist.gather, rank=ctx.dist.rank,
                ).to(device)
        if strategy.selects:
            strategy.extend_candidates(cand, batch, ctx)
            k = num_to_keep(size, self.select_rate)
            generator = selection_generator(self.seed, ctx.step, ctx.dist.rank)
            if cand.clip_scores is not None:
                strategy.before_scored_criterion(cand)
            crit = strategy.criterion(cand, strategy.bank)
            if crit is None:
                keep = torch.randperm(size, generator=generator)[:k].to(device)
            elif self.exploration > 0:
                keep = keep_with_exploration(crit, k, self.exploration, generator, strategy.random_ties)
            else:  # top-k, or the strategy's own sampling (JEST joint selection)
                keep = strategy.select(crit, k, cand, generator, ctx)
        else:
            crit, keep = None, None
        self._record(batch, cand, crit, keep, ctx)
        return keep

    def _stale_keep(self, cand: Candidates, step: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(criterion, keep)`` of candidate batch ``step`` from the stored last-visit state (a pure read)."""
        size = cand.sample_idx.shape[0]
        unscored = self._stale_candidates(cand)
        k = num_to_keep(size, self.select_rate)
        generator = selection_generator(self.seed, step, self.storage.ownership.rank)
        crit = self.strategy.criterion(cand, self.strategy.bank)
        if crit is None:
            return None, torch.randperm(size, generator=generator)[:k].to(cand.sample_idx.device)
        # never trained: first (each pair is scored once before its score can reject it); ties at random
        crit = torch.where(unscored, torch.full_like(crit.float(), float("inf")), crit.float())
        return crit, keep_with_exploration(crit, k, self.exploration, generator, random_ties=True)

    def select_candidates(self, sample_idx: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """``selection_in_sampler``: local keep indices of candidate batch ``step`` (pass ``epoch``) from the view
        of the state as of step ``step - L``; the same as :meth:`prepare` computes for that batch with the same
        lag. Raises :class:`~hf_mmsel.state.SelectionLagError` when step ``step - L`` has not been trained yet."""
        self._require_setup()
        cand = Candidates(sample_idx=torch.as_tensor(sample_idx).to(self.storage.device).long(), epoch=epoch)
        with self._lagged_view(step):
            return self._stale_keep(cand, step)[1]
    def _stale_candidates(self, cand: Candidates) -> torch.Tensor:
        """Fill ``cand`` from the stored last-visit values (0 where never trained); returns the never-trained mask."""
        stored = self.last_visit[self.storage.slots(cand.sample_idx)].float()
        unscored = torch.isnan(stored)
        stored = torch.where(unscored, torch.zeros_like(stored), stored)
        if self.strategy.requires == "loss":
            cand.losses = stored
        else:
            cand.cosine, cand.clip_scores = stored, 100.0 * stored.clamp(min=0.0)
        return unscored

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx):
        """``last_visit``: record the kept pairs' ``cos(v_i, u_i)`` (or ``l_i``) of this training forward into the
        owner's state, then the strategy's bank update from it. No weights, no extra loss."""
        if not self.stale:
            return LossTerms()
        if ctx.network is not None:
            raise RuntimeError("selection_score_source='last_visit' is not supported with GSC+ co-training yet")
        storage = self._require_setup()
        idx = sample_idx.to(storage.device).long()
        slots = storage.slots(idx)
        with torch.no_grad():
            cos = (image_embeds.detach().float() * text_embeds.detach().float()).sum(-1).to(storage.device)
            value = per_sample_loss.detach().float().to(storage.device) if self.strategy.requires == "loss" else cos
            self.records.push(ctx.step, ctx.epoch, idx, value.to(self.last_visit.dtype))
            # the selection of step t+1 reads the state as of step t+1-L: commit what it needs, keep L-1 pending
            for record in self.records.pop_through(ctx.step + 1 - self.lag):
                self._apply_record(record)
            if self.diagnostics:
                self.last_score[slots] = 100.0 * cos.clamp(min=0.0)
                self.scored_epoch[slots] = ctx.epoch
        return LossTerms()

    def _apply_record(self, record: StepRecord) -> None:
        """Step ``record.step``'s training record into the state: ``last_visit`` and the strategy's bank update
        (from the rounded stored value, so ``h == s`` exactly until the pair is trained again)."""
        slots = self.storage.slots(record.sample_idx)
        self.last_visit[slots] = record.value.to(self.last_visit.device)
        stored = self.last_visit[slots].float()
        self.strategy.record_training_visit(record.sample_idx, 100.0 * stored.clamp(min=0.0), record.epoch)

    @contextlib.contextmanager
    def _lagged_view(self, step: int):
        """The stored state as of step ``step - L``: the committed arrays plus the pending records of steps
        ``<= step - L``, applied for the duration of the block and then undone."""
        self.records.check_trained(step - self.lag, step, self.lag)
        pending = self.records.through(step - self.lag)
        if not pending:
            yield
            return
        slots = torch.unique(torch.cat([self.storage.slots(r.sample_idx) for r in pending]))
        arrays = [self.last_visit, *self.strategy.state_arrays()]
        saved = [a[slots].clone() for a in arrays]
        try:
            for record in pending:
                self._apply_record(record)
            yield
        finally:
            for a, v in zip(arrays, saved):
                a[slots] = v

    def _record(self, batch, cand: Candidates, crit, keep, ctx: StepContext) -> None:
        """Local bank update (this rank owns its candidates), local diagnostics, step logs."""
        size = cand.sample_idx.shape[0]
        noisy = batch.get("is_noisy")
        fresh = not self.stale  # stale: the bank and last_score are written at the training record (loss_terms)
        if fresh and cand.clip_scores is not None:
            self.strategy.record_scores(cand.sample_idx, cand.clip_scores, cand.epoch)
        if self.diagnostics:
            slots = self.storage.slots(cand.sample_idx)
            if fresh and cand.clip_scores is not None:
                self.last_score[slots] = cand.clip_scores
                self.scored_epoch[slots] = cand.epoch
            if crit is not None:  # +inf of never-trained pairs (stale) is stored as unknown (NaN)
                crit = crit.float()
                self.last_criterion[slots] = torch.where(torch.isinf(crit), torch.full_like(crit, float("nan")), crit)
            if noisy is not None:
                self.noisy[slots] = noisy.to(self.noisy.device).to(torch.int8)
        ctx.log("selection/kept_fraction", (keep.numel() if keep is not None else size) / size)
        if cand.clip_scores is not None:
            ctx.log("selection/score_mean", cand.clip_scores.mean())
            ctx.log("selection/score_std", cand.clip_scores.std())
            if keep is not None:
                ctx.log("selection/selected_score_mean", cand.clip_scores[keep].mean())
        if noisy is not None:
            flags = noisy.to(cand.sample_idx.device).float()
            ctx.log("selection/candidate_noisy_fraction", flags.mean())
            ctx.log("selected_noisy_fraction", flags[keep].mean() if keep is not None else flags.mean())

    # ------------------------------------------------------------------------------------------- epochs
    def on_pass_end(self, pass_index: int, dist: Dist) -> dict[str, float]:
        """With diagnostics: histograms of this pass's CLIPScores for clean and noisy pairs (summed over ranks,
        for the end-of-training plot) and the pass's mean scores."""
        self._require_setup()
        if not self.diagnostics:
            return {}
        scored = self.scored_epoch == pass_index
        edges = torch.linspace(0.0, 100.0, _HIST_BINS + 1)
        scores, noisy = self.last_score[scored].cpu().float(), self.noisy[scored].cpu()
        hist = torch.stack([torch.histogram(scores[noisy == flag], bins=edges).hist for flag in (-1, 0, 1)])
        sums = torch.tensor([[scores[noisy == f].sum().item(), float((noisy == f).sum())] for f in (-1, 0, 1)],
                            dtype=torch.float64)
        if dist.world_size > 1:
            import torch.distributed as tdist

            packed = torch.cat([hist.double().flatten(), sums.flatten()]).to(self.last_score.device)
            tdist.all_reduce(packed)
            packed = packed.cpu()
            hist = packed[: hist.numel()].reshape(hist.shape).float()
            sums = packed[hist.numel():].reshape(3, 2)
        total = float(sums[:, 1].sum())
        if total == 0:
            return {}
        if float(sums[1:, 1].sum()) == 0:  # no ground truth: everything is shown as one distribution
            hist = torch.stack([hist[0], torch.zeros_like(hist[0])])
        else:
            hist = torch.stack([hist[0] + hist[1], hist[2]])
        self.epoch_histograms.append(hist)
        self.histogram_epochs.append(int(pass_index))
        logs = {"selection/epoch_score_mean": float(sums[:, 0].sum()) / total}
        if float(sums[1, 1]) > 0 and float(sums[2, 1]) > 0:
            logs["selection/epoch_clean_score_mean"] = float(sums[1, 0] / sums[1, 1])
            logs["selection/epoch_noisy_score_mean"] = float(sums[2, 0] / sums[2, 1])
        return logs

    def clean_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(criterion, noisy)`` of each owned pair's last visit (NaN / -1 where unknown), local slots; needs
        ``diagnostics=True``."""
        self._require_setup()
        if not self.diagnostics:
            raise RuntimeError("SelectionHook.clean_scores needs diagnostics=True (selection_diagnostics)")
        return self.last_criterion.cpu(), self.noisy.cpu()
