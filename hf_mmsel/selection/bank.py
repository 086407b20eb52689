"""``ScoreBank``: the per-sample "historical model" of DISSect (docs/design.md, DISSect §2, §8).

One float32 ``hist`` (warm-up snapshot or EMA of CLIPScores) and one bool ``seen`` ("never scored" is not the same
as a score of 0, which the official code conflates): 5 B per sample. The arrays live in the sharded
:class:`~hf_mmsel.state.PerSampleState`: a rank holds only the samples it owns and indexes them by global
``sample_idx``; the owner-stable data order makes every lookup and update local. A bank built from
``num_samples`` alone owns everything (one process).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..state import PerSampleState, SampleOwnership, StateNamespace

__all__ = ["ScoreBank"]

_MODES = ("overwrite", "ema")


class ScoreBank:
    """Per-sample score table indexed by ``sample_idx`` in ``[0, num_samples)`` (local slots of owned samples)."""

    def __init__(self, num_samples: int | None = None, device: torch.device | str = "cpu", *,
                 storage: StateNamespace | None = None) -> None:
        if storage is None:
            if num_samples is None or num_samples < 1:
                raise ValueError(f"ScoreBank needs num_samples >= 1, got {num_samples}")
            storage = PerSampleState(SampleOwnership.single(num_samples), device).namespace("bank")
        self.storage = storage
        self.hist = storage.add("hist", torch.float32, 0.0)
        self.seen = storage.add("seen", torch.bool, False)

    def __len__(self) -> int:
        return self.storage.ownership.num_samples

    def lookup(self, idx: torch.Tensor, fallback: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``h[idx]`` where seen, else ``fallback`` (a scalar or a tensor shaped like ``idx``)."""
        slots = self.storage.slots(idx)
        fallback = torch.as_tensor(fallback, dtype=self.hist.dtype, device=self.hist.device)
        return torch.where(self.seen[slots], self.hist[slots], fallback)

    def is_seen(self, idx: torch.Tensor) -> torch.Tensor:
        return self.seen[self.storage.slots(idx)]

    @torch.no_grad()
    def update(self, idx: torch.Tensor, scores: torch.Tensor, mode: str = "overwrite", beta: float = 0.9) -> None:
        """Write ``scores`` at the (owned) ``idx``.

        ``overwrite``: ``h <- s`` (the warm-up snapshot, docs/design.md, DISSect §2a). ``ema``: ``h <- beta*h +
        (1-beta)*s`` for seen samples and ``h <- s`` on a sample's first visit (the momentum variant, §2b).
        """
        if mode not in _MODES:
            raise ValueError(f"unknown ScoreBank update mode {mode!r}; choose one of {list(_MODES)}")
        slots = self.storage.slots(idx)
        scores = scores.to(self.hist.device, torch.float32)
        if mode == "ema":
            scores = torch.where(self.seen[slots], beta * self.hist[slots] + (1.0 - beta) * scores, scores)
        self.hist[slots] = scores
        self.seen[slots] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"hist": self.hist.detach().cpu().clone(), "seen": self.seen.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state["hist"].shape != self.hist.shape:
            raise ValueError(
                f"ScoreBank size mismatch: checkpoint has {state['hist'].numel()} samples, this run {self.hist.numel()}"
            )
        self.hist.copy_(state["hist"].to(self.hist.device))
        self.seen.copy_(state["seen"].to(self.seen.device).bool())
