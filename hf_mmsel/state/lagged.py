"""A lagged view of per-sample state (docs/design.md, Scale §D): the FIFO of the last training records.

The selection of candidate batch ``b`` reads the state *as of step b - L*: the training records of the batches
``<= b - L`` and nothing newer. The record of step ``t`` is pushed after its loss; right away the records the next
in-trainer selection needs (``<= t + 1 - L``) are committed into the arrays, the last ``L - 1`` stay pending in
this FIFO. A batch sampler running ahead of training (``selection_in_sampler``) sees the committed arrays plus the
pending records ``<= b - L`` (applied and undone around its read). The view is therefore a pure function of ``b``,
independent of ``num_workers`` and prefetching, and identical in both paths; the FIFO is checkpointed per rank,
so a resumed run selects what an uninterrupted one does. Plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .ownership import SampleOwnership

__all__ = ["LaggedRecords", "SelectionLagError", "StepRecord"]


class SelectionLagError(RuntimeError):
    """The batch sampler drew a candidate batch whose lagged view needs a step that has not been trained yet
    (prefetching runs further ahead than ``selection_lag``)."""


@dataclass
class StepRecord:
    """One training step's record on this rank: the kept pairs and their last-visit value."""

    step: int
    epoch: int
    sample_idx: torch.Tensor  # [k] long, owned by this rank
    value: torch.Tensor  # [k] (float16)


class LaggedRecords:
    """FIFO of pending :class:`StepRecord`s in step order plus the last trained step."""

    def __init__(self) -> None:
        self.pending: list[StepRecord] = []
        self.trained_through = -1  # last step whose record was pushed

    def push(self, step: int, epoch: int, sample_idx: torch.Tensor, value: torch.Tensor) -> None:
        if self.pending and int(step) <= self.pending[-1].step:
            raise ValueError(f"training records must arrive in step order: {step} after {self.pending[-1].step}")
        self.pending.append(StepRecord(int(step), int(epoch), sample_idx.detach().long(), value.detach()))
        self.trained_through = max(self.trained_through, int(step))

    def through(self, step: int) -> list[StepRecord]:
        """Pending records of steps ``<= step`` (not removed)."""
        return [r for r in self.pending if r.step <= step]

    def pop_through(self, step: int) -> list[StepRecord]:
        """Remove and return the pending records of steps ``<= step`` (to commit them, in order)."""
        done = self.through(step)
        self.pending = self.pending[len(done):]
        return done

    def check_trained(self, needed: int, batch: int, lag: int) -> None:
        if needed > self.trained_through:
            raise SelectionLagError(
                f"candidate batch {batch} was drawn before step {needed} = {batch} - selection_lag({lag}) was "
                f"trained (last trained step: {self.trained_through}): the DataLoader prefetches further ahead than "
                "the lag; raise selection_lag or lower dataloader_num_workers * dataloader_prefetch_factor"
            )

    # --------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        p = self.pending
        return {
            "lag.trained_through": torch.tensor(self.trained_through, dtype=torch.long),
            "lag.steps": torch.tensor([r.step for r in p], dtype=torch.long),
            "lag.epochs": torch.tensor([r.epoch for r in p], dtype=torch.long),
            "lag.lengths": torch.tensor([r.sample_idx.numel() for r in p], dtype=torch.long),
            "lag.sample_idx": torch.cat([r.sample_idx.cpu() for r in p]) if p else torch.zeros(0, dtype=torch.long),
            "lag.value": torch.cat([r.value.cpu() for r in p]) if p else torch.zeros(0, dtype=torch.float16),
        }

    @classmethod
    def merged(cls, states: Sequence[Mapping[str, torch.Tensor]], ownership: SampleOwnership) -> "LaggedRecords":
        """The records of one or more saved FIFOs (old ranks after a world-size change), restricted to the samples
        ``ownership`` owns and merged by step."""
        by_step: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        out = cls()
        for state in states:
            if "lag.steps" not in state:
                continue
            out.trained_through = max(out.trained_through, int(state["lag.trained_through"]))
            idx_all = state["lag.sample_idx"].split(state["lag.lengths"].tolist())
            val_all = state["lag.value"].split(state["lag.lengths"].tolist())
            for step, epoch, idx, val in zip(state["lag.steps"].tolist(), state["lag.epochs"].tolist(), idx_all,
                                             val_all):
                mine = ownership.owns(idx)
                by_step.setdefault(int(step), []).append((int(epoch), idx[mine], val[mine]))
        for step in sorted(by_step):
            parts = by_step[step]
            idx = torch.cat([p[1] for p in parts])
            if idx.numel():
                out.pending.append(StepRecord(step, parts[0][0], idx, torch.cat([p[2] for p in parts])))
        return out
