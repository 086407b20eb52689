"""``ScoreBank``: the per-sample "historical model" of DISSect (dissect.md §2, §8).

One float32 ``hist[N]`` (warm-up snapshot or EMA of CLIPScores) and one bool ``seen[N]`` ("never scored" is not
the same as a score of 0, which the official code conflates). The bank is *replicated*: every rank applies the
same update with the globally gathered ``(sample_idx, score)`` pairs, so all ranks hold identical values, and it
is saved with every checkpoint (fixing bugs 1-3 of dissect.md §7).
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["ScoreBank"]

_MODES = ("overwrite", "ema")


class ScoreBank:
    """Per-sample score table indexed by ``sample_idx`` in ``[0, num_samples)``."""

    def __init__(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        if num_samples < 1:
            raise ValueError(f"ScoreBank needs num_samples >= 1, got {num_samples}")
        self.hist = torch.zeros(num_samples, dtype=torch.float32, device=device)
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.hist.numel()

    def lookup(self, idx: torch.Tensor, fallback: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``h[idx]`` where seen, else ``fallback`` (a scalar or a tensor shaped like ``idx``)."""
        idx = idx.to(self.hist.device)
        fallback = torch.as_tensor(fallback, dtype=self.hist.dtype, device=self.hist.device)
        return torch.where(self.seen[idx], self.hist[idx], fallback)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, scores: torch.Tensor, mode: str = "overwrite", beta: float = 0.9) -> None:
        """Write gathered ``scores`` at ``idx``.

        ``overwrite``: ``h <- s`` (the warm-up snapshot, dissect.md §2a). ``ema``: ``h <- beta*h + (1-beta)*s`` for
        seen samples and ``h <- s`` on a sample's first visit (the momentum variant, §2b).
        """
        if mode not in _MODES:
            raise ValueError(f"unknown ScoreBank update mode {mode!r}; choose one of {list(_MODES)}")
        idx = idx.to(self.hist.device).long()
        scores = scores.to(self.hist.device, torch.float32)
        if mode == "ema":
            scores = torch.where(self.seen[idx], beta * self.hist[idx] + (1.0 - beta) * scores, scores)
        self.hist[idx] = scores
        self.seen[idx] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"hist": self.hist.detach().cpu().clone(), "seen": self.seen.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state["hist"].shape != self.hist.shape:
            raise ValueError(
                f"ScoreBank size mismatch: checkpoint has {state['hist'].numel()} samples, this run {len(self)}"
            )
        self.hist.copy_(state["hist"].to(self.hist.device))
        self.seen.copy_(state["seen"].to(self.seen.device).bool())
