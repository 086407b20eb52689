"""``SelectionHook``: online sample selection as a :class:`~hf_mmsel.hooks.BatchHook` (dissect.md §8).

Each step, on every rank: run the strategy's no-grad scoring forward only when it needs one, compute the keep
criterion, keep ``k = round(r * B)`` pairs (the same k on every rank), then all-gather ``(sample_idx, s,
criterion, is_noisy)`` once and apply identical updates to the replicated :class:`ScoreBank` and diagnostic tables.
Randomness comes from a generator seeded by ``(seed, step, rank)``, so a resumed run draws exactly what an
uninterrupted run draws.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..hooks import BatchHook, Dist, StepContext
from .bank import ScoreBank
from .strategies import Candidates, SelectionStrategy, build_strategy, top_k

__all__ = ["SelectionHook", "clip_score", "num_to_keep", "selection_generator"]

_HIST_BINS = 25


def num_to_keep(batch_size: int, select_rate: float) -> int:
    """``k = round(r * B)``, at least 1 (the official ``int(r*B)`` truncates, dissect.md §6)."""
    return max(1, min(batch_size, int(round(select_rate * batch_size))))


def selection_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator for the random draws of candidate batch ``step`` on ``rank``: a pure function of its
    arguments, so resuming at any step reproduces the uninterrupted run's draws."""
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(step)) * 4096 + int(rank)) % (2**63))


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, s)`` per pair with ``s = 100 * max(cos, 0)`` (dissect.md §6); reduced in float32."""
    cos = (image_embeds.float() * text_embeds.float()).sum(-1)
    return cos, 100.0 * cos.clamp(min=0.0)


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
        strategy_options: forwarded to :func:`build_strategy` (``warmup_epochs``, ``ema_beta``, ...).

    Diagnostic tables (replicated, checkpointed): last CLIPScore and keep criterion of every pair, the epoch it was
    last scored in, and the ground-truth ``is_noisy`` flag when batches carry it (never used for selection).
    """

    def __init__(
        self, strategy: str | SelectionStrategy = "dissect", select_rate: float = 0.5, *, seed: int = 0,
        **strategy_options,
    ) -> None:
        self.select_rate = _check_rate(select_rate)
        self.strategy = strategy if isinstance(strategy, SelectionStrategy) else build_strategy(strategy, **strategy_options)
        self.seed = int(seed)
        self.bank: ScoreBank | None = None
        self.epoch_histograms: list[torch.Tensor] = []  # per finished epoch: [2 (clean, noisy), bins]
        self.histogram_epochs: list[int] = []

    # ----------------------------------------------------------------------------------------------- state
    def setup(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        self.bank = ScoreBank(num_samples, device)
        self.last_score = torch.full((num_samples,), float("nan"), device=device)
        self.last_criterion = torch.full((num_samples,), float("nan"), device=device)
        self.scored_epoch = torch.full((num_samples,), -1, dtype=torch.long, device=device)
        self.noisy = torch.full((num_samples,), -1, dtype=torch.int8, device=device)  # -1 unknown, 0 clean, 1 noisy

    def _require_setup(self) -> ScoreBank:
        if self.bank is None:
            raise RuntimeError("SelectionHook.setup(num_samples, device) must be called before the first step")
        return self.bank

    def state_dict(self) -> dict[str, torch.Tensor]:
        bank = self._require_setup()
        state = {f"bank.{k}": v for k, v in bank.state_dict().items()}
        state.update(
            last_score=self.last_score.cpu().clone(), last_criterion=self.last_criterion.cpu().clone(),
            scored_epoch=self.scored_epoch.cpu().clone(), noisy=self.noisy.cpu().clone(),
            histogram_epochs=torch.tensor(self.histogram_epochs, dtype=torch.long),
            epoch_histograms=(torch.stack(self.epoch_histograms) if self.epoch_histograms
                              else torch.zeros(0, 2, _HIST_BINS)),
        )
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        bank = self._require_setup()
        bank.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bank.")})
        for name in ("last_score", "last_criterion", "scored_epoch", "noisy"):
            getattr(self, name).copy_(state[name])
        self.histogram_epochs = [int(e) for e in state["histogram_epochs"]]
        self.epoch_histograms = list(state["epoch_histograms"].unbind(0))

    # ------------------------------------------------------------------------------------------------ step
    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        bank = self._require_setup()
        device = bank.hist.device
        sample_idx = batch["sample_idx"].to(device).long()
        size = sample_idx.shape[0]
        strategy = self.strategy
        cand = Candidates(sample_idx=sample_idx, epoch=ctx.epoch)
        if strategy.selects and strategy.needs_scoring(ctx.epoch):
            emb = ctx.score()
            cand.cosine, cand.clip_scores = (t.to(device) for t in clip_score(emb.image_embeds, emb.text_embeds))
            if strategy.requires == "loss":  # the training loss per pair: InfoNCE or SigLIP's sigmoid (ctx.loss)
                cand.losses = ctx.loss.detached().per_sample(
                    emb.image_embeds.float(), emb.text_embeds.float(), emb.logit_scale.float(),
                    gather_fn=ctx.dist.gather, rank=ctx.dist.rank,
                ).to(device)
        if strategy.selects:
            k = num_to_keep(size, self.select_rate)
            generator = selection_generator(self.seed, ctx.step, ctx.dist.rank)
            crit = strategy.criterion(cand, bank)
            if crit is None:
                keep = torch.randperm(size, generator=generator)[:k].to(device)
            else:
                keep = top_k(crit, k, generator if strategy.random_ties else None)
        else:
            crit, keep = None, None
        self._record(batch, cand, crit, keep, ctx)
        return keep

    def _record(self, batch, cand: Candidates, crit, keep, ctx: StepContext) -> None:
        """One gather of ``(idx, s, criterion, is_noisy)``; identical table updates on every rank; step logs."""
        bank = self.bank
        size = cand.sample_idx.shape[0]
        noisy = batch.get("is_noisy")
        nan = torch.full((size,), float("nan"), device=bank.hist.device)
        noisy_f = noisy.to(bank.hist.device).float() if noisy is not None else nan
        columns = [cand.clip_scores if cand.clip_scores is not None else nan,
                   crit.float() if crit is not None else nan, noisy_f]
        if cand.clip_scores is not None or crit is not None or noisy is not None:
            idx_all = ctx.dist.gather(cand.sample_idx)
            s_all, crit_all, noisy_all = ctx.dist.gather(torch.stack(columns, dim=1)).unbind(1)
            if cand.clip_scores is not None:
                self.strategy.update_bank(bank, idx_all, s_all, cand.epoch)
                self.last_score[idx_all] = s_all
                self.scored_epoch[idx_all] = cand.epoch
            if crit is not None:
                self.last_criterion[idx_all] = crit_all
            if noisy is not None:
                self.noisy[idx_all] = noisy_all.to(torch.int8)
        ctx.log("selection/kept_fraction", (keep.numel() if keep is not None else size) / size)
        if cand.clip_scores is not None:
            ctx.log("selection/score_mean", cand.clip_scores.mean())
            ctx.log("selection/score_std", cand.clip_scores.std())
            if keep is not None:
                ctx.log("selection/selected_score_mean", cand.clip_scores[keep].mean())
        if noisy is not None:
            flags = noisy.to(bank.hist.device).float()
            ctx.log("selection/candidate_noisy_fraction", flags.mean())
            ctx.log("selected_noisy_fraction", flags[keep].mean() if keep is not None else flags.mean())

    # ------------------------------------------------------------------------------------------- epochs
    def on_epoch_end(self, epoch: int, dist: Dist) -> dict[str, float]:
        """Store histograms of this epoch's CLIPScores for clean and noisy pairs (for the end-of-training plot)."""
        self._require_setup()
        scored = self.scored_epoch == epoch
        if not bool(scored.any()):
            return {}
        edges = torch.linspace(0.0, 100.0, _HIST_BINS + 1)
        scores, noisy = self.last_score[scored].cpu(), self.noisy[scored].cpu()
        hist = torch.stack([torch.histogram(scores[noisy == flag].float(), bins=edges).hist for flag in (0, 1)])
        if bool((noisy < 0).all()):  # no ground truth: everything is shown as one distribution
            hist[0] = torch.histogram(scores.float(), bins=edges).hist
        self.epoch_histograms.append(hist)
        self.histogram_epochs.append(int(epoch))
        logs = {"selection/epoch_score_mean": float(scores.mean())}
        known = noisy >= 0
        if bool(known.any()) and bool((noisy == 1).any()) and bool((noisy == 0).any()):
            logs["selection/epoch_clean_score_mean"] = float(scores[noisy == 0].mean())
            logs["selection/epoch_noisy_score_mean"] = float(scores[noisy == 1].mean())
        return logs

    def clean_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(criterion[N], noisy[N])`` of each pair's last visit (NaN / -1 where unknown), for detection AUROC."""
        self._require_setup()
        return self.last_criterion.cpu(), self.noisy.cpu()
