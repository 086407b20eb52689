"""Schedules in passes over the pool (issue 8 item 2): warm-up, DISSect's snapshot pass and GSC's pass-end update.

A *pass* is ``batches_per_pass`` candidate batches per rank: ``len(train dataloader)`` for a map-style dataset
(one epoch of the owner-stable sampler), ``ceil(N / (W * B))`` for a stream. The pass of candidate batch ``t``
(counted from 0 on every rank, restored on resume) is ``t // batches_per_pass``, so the schedule is the same
with ``num_train_epochs``, ``max_steps`` or an infinite stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["PassSchedule", "default_warmup_passes", "streaming_batches_per_pass"]


def default_warmup_passes(num_passes: float) -> int:
    """DISSect's default warm-up W: a quarter of the passes over the pool, at least 1 (the paper's scripts: 10 of
    40 epochs)."""
    if not math.isfinite(float(num_passes)) or num_passes < 0:
        raise ValueError(f"num_passes must be a finite number >= 0, got {num_passes}")
    return max(1, int(round(float(num_passes) / 4)))


def streaming_batches_per_pass(num_samples: int, world_size: int, batch_size: int) -> int:
    """``ceil(N / (W * B))``: candidate batches per rank that cover the pool once."""
    return max(1, math.ceil(int(num_samples) / (int(world_size) * int(batch_size))))


@dataclass(frozen=True)
class PassSchedule:
    """``batches_per_pass`` candidate batches per rank make one pass; training lasts ``total_batches``."""

    batches_per_pass: int
    total_batches: int

    def __post_init__(self) -> None:
        if self.batches_per_pass < 1:
            raise ValueError(f"batches_per_pass must be >= 1, got {self.batches_per_pass}")

    def pass_of(self, batch: int) -> int:
        return int(batch) // self.batches_per_pass

    @property
    def total_passes(self) -> float:
        return self.total_batches / self.batches_per_pass

    def default_warmup_passes(self) -> int:
        """:func:`default_warmup_passes` of the real number of passes."""
        return default_warmup_passes(self.total_passes)

    def check_warmup(self, warmup_passes: int) -> None:
        """DISSect selects from pass ``W`` on: an error naming both numbers if training ends before it."""
        if warmup_passes * self.batches_per_pass >= self.total_batches:
            raise UsageError(
                f"DISSect warm-up of {warmup_passes} passes reaches the end of training ({self.total_passes:g} "
                f"passes = {self.total_batches} candidate batches of which {self.batches_per_pass} per pass): it "
                f"would never select; {'lower selection_warmup_passes or ' * (warmup_passes > 1)}train more passes / max_steps"
            )
