"""``SelectionHook``: online sample selection as a :class:`~hf_mmsel.hooks.BatchHook` (dissect.md §8).

Each step, on every rank: run the strategy's no-grad scoring forward only when it needs one, compute the keep
criterion, keep ``k = round(r * B)`` pairs (the same k on every rank), then update the rank's shard of the
:class:`ScoreBank` with its own ``(sample_idx, s)``: the owner-stable data order puts only owned samples in a
rank's batches, so no collective is needed. Ground-truth diagnostics (last score / criterion, scored pass,
``is_noisy``, per-pass histograms) are allocated only with ``diagnostics=True``.
Randomness comes from a generator seeded by ``(seed, step, rank)``, so a resumed run draws exactly what an
uninterrupted run draws.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..hooks import BatchHook, Dist, StepContext
from ..state import PerSampleState, SampleOwnership, StateNamespace
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
        diagnostics: also keep (sharded, checkpointed) the last CLIPScore and keep criterion of every pair, the
            pass it was last scored in and the ground-truth ``is_noisy`` flag when batches carry it (never used for
            selection), and per-pass score histograms; off by default (17 B/sample more).
        strategy_options: forwarded to :func:`build_strategy` (``warmup_epochs``, ``ema_beta``, ...).
    """

    state_kind = "selection"

    def __init__(
        self, strategy: str | SelectionStrategy = "dissect", select_rate: float = 0.5, *, seed: int = 0,
        diagnostics: bool = False, **strategy_options,
    ) -> None:
        self.select_rate = _check_rate(select_rate)
        self.strategy = strategy if isinstance(strategy, SelectionStrategy) else build_strategy(strategy, **strategy_options)
        self.seed = int(seed)
        self.diagnostics = bool(diagnostics)
        self.bank: ScoreBank | None = None
        self._storage: StateNamespace | None = None
        self.epoch_histograms: list[torch.Tensor] = []  # per finished pass: [2 (clean, noisy), bins]
        self.histogram_epochs: list[int] = []

    # ----------------------------------------------------------------------------------------------- state
    def setup(self, num_samples: int, device: torch.device | str = "cpu", storage: StateNamespace | None = None) -> None:
        if storage is None:
            storage = PerSampleState(SampleOwnership.single(num_samples), device).namespace("selection")
        self._storage = storage
        self.bank = ScoreBank(storage=storage.namespace("bank")) if self.strategy.uses_bank else None
        if self.diagnostics:
            self.last_score = storage.add("last_score", torch.float32, float("nan"))
            self.last_criterion = storage.add("last_criterion", torch.float32, float("nan"))
            self.scored_epoch = storage.add("scored_epoch", torch.int32, -1)
            self.noisy = storage.add("noisy", torch.int8, -1)  # -1 unknown, 0 clean, 1 noisy
        else:
            self.last_score = self.last_criterion = self.scored_epoch = self.noisy = None

    @property
    def device(self) -> torch.device:
        return self._require_setup().device

    def _require_setup(self) -> StateNamespace:
        if self._storage is None:
            raise RuntimeError("SelectionHook.setup(num_samples, device) must be called before the first step")
        return self._storage

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_setup()
        state = {f"bank.{k}": v for k, v in self.bank.state_dict().items()} if self.bank is not None else {}
        if self.diagnostics:
            state.update(
                last_score=self.last_score.cpu().clone(), last_criterion=self.last_criterion.cpu().clone(),
                scored_epoch=self.scored_epoch.cpu().clone(), noisy=self.noisy.cpu().clone(),
                histogram_epochs=torch.tensor(self.histogram_epochs, dtype=torch.long),
                epoch_histograms=(torch.stack(self.epoch_histograms) if self.epoch_histograms
                                  else torch.zeros(0, 2, _HIST_BINS)),
            )
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._require_setup()
        if self.bank is not None:
            self.bank.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bank.")})
        if self.diagnostics:
            for name in ("last_score", "last_criterion", "scored_epoch", "noisy"):
                getattr(self, name).copy_(state[name])
            self.histogram_epochs = [int(e) for e in state["histogram_epochs"]]
            self.epoch_histograms = list(state["epoch_histograms"].unbind(0))

    # ------------------------------------------------------------------------------------------------ step
    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        storage = self._require_setup()
        device = storage.device
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
            strategy.extend_candidates(cand, batch, ctx)
            k = num_to_keep(size, self.select_rate)
            generator = selection_generator(self.seed, ctx.step, ctx.dist.rank)
            if self.bank is not None and cand.clip_scores is not None:
                strategy.before_criterion(self.bank, cand)
            crit = strategy.criterion(cand, self.bank)
            if crit is None:
                keep = torch.randperm(size, generator=generator)[:k].to(device)
            else:
                keep = strategy.select(crit, k, cand, generator, ctx)
        else:
            crit, keep = None, None
        self._record(batch, cand, crit, keep, ctx)
        return keep

    def _record(self, batch, cand: Candidates, crit, keep, ctx: StepContext) -> None:
        """Local bank update (this rank owns its candidates), local diagnostics, step logs."""
        size = cand.sample_idx.shape[0]
        noisy = batch.get("is_noisy")
        if cand.clip_scores is not None and self.bank is not None:
            self.strategy.update_bank(self.bank, cand.sample_idx, cand.clip_scores, cand.epoch)
        if self.diagnostics:
            slots = self._storage.slots(cand.sample_idx)
            if cand.clip_scores is not None:
                self.last_score[slots] = cand.clip_scores
                self.scored_epoch[slots] = cand.epoch
            if crit is not None:
                self.last_criterion[slots] = crit.float()
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
    def on_epoch_end(self, epoch: int, dist: Dist) -> dict[str, float]:
        """With diagnostics: histograms of this pass's CLIPScores for clean and noisy pairs (summed over ranks,
        for the end-of-training plot) and the pass's mean scores."""
        self._require_setup()
        if not self.diagnostics:
            return {}
        scored = self.scored_epoch == epoch
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
        self.histogram_epochs.append(int(epoch))
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
