"""Which rank owns each ``sample_idx`` and where the sample lives in that rank's arrays (docs/design.md, Scale §B (i)).

Two rules, both fixed functions of ``sample_idx`` and the world size ``W``:

* ``modulo`` (map-style datasets): rank ``r`` owns ``{i : i mod W = r}``; local slot ``i // W``. The
  owner-stable batch sampler (:class:`~hf_mmsel.state.sampler.OwnerStableBatchSampler`) makes rank ``r`` draw its
  candidates only from the indices it owns, so every lookup/update of per-sample state is local.
* ``ranges`` (streaming shards): rank ``r`` owns the half-open ``sample_idx`` ranges of the shards it reads
  (``owned_ranges`` of the shard manifest); local slot = offset of the range + position in it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SampleOwnership", "NotOwnedError"]


class NotOwnedError(IndexError):
    """A rank was asked for a sample it does not own (the data order does not follow the ownership rule)."""


class SampleOwnership:
    """Ownership of ``num_samples`` samples across ``world_size`` ranks, seen from ``rank``."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0, *, rule: str = "modulo",
                 ranges: torch.Tensor | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if rule not in ("modulo", "ranges"):
            raise ValueError(f"unknown ownership rule {rule!r}; choose 'modulo' or 'ranges'")
        self.num_samples, self.world_size, self.rank, self.rule = int(num_samples), int(world_size), int(rank), rule
        if rule == "ranges":
            if ranges is None:
                raise ValueError("rule 'ranges' needs the owned [n, 2] sample_idx ranges")
            ranges = torch.as_tensor(ranges, dtype=torch.long).reshape(-1, 2)
            ranges = ranges[torch.argsort(ranges[:, 0])]
            if ranges.numel() and (int(ranges[:, 0].min()) < 0 or int(ranges[:, 1].max()) > self.num_samples
                                   or bool((ranges[:, 1] < ranges[:, 0]).any())
                                   or bool((ranges[1:, 0] < ranges[:-1, 1]).any())):
                raise ValueError(f"owned ranges must be disjoint, sorted and inside [0, {num_samples}): {ranges.tolist()}")
            self.ranges = ranges
            lengths = ranges[:, 1] - ranges[:, 0]
            self._offsets = torch.cumsum(lengths, 0) - lengths
            self.num_local = int(lengths.sum())
        else:
            self.ranges = None
            self.num_local = len(range(self.rank, self.num_samples, self.world_size))
        self._cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # -------------------------------------------------------------------------------------------- queries
    @classmethod
    def single(cls, num_samples: int) -> "SampleOwnership":
        """One process owning everything (the replicated layout of a single-process run)."""
        return cls(num_samples, 1, 0)

    def global_indices(self) -> torch.Tensor:
        """``[num_local]`` sample_idx of the local slots, in slot order."""
        if self.rule == "modulo":
            return torch.arange(self.rank, self.num_samples, self.world_size, dtype=torch.long)
        if self.ranges.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(int(a), int(b)) for a, b in self.ranges.tolist()])

    def global_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``sample_idx`` of the given local slots (no O(num_local) allocation)."""
        slots = slots.long()
        if self.rule == "modulo":
            return slots * self.world_size + self.rank
        starts, _, offsets = self._tables(slots.device)
        j = torch.searchsorted(offsets, slots, right=True) - 1
        return starts[j] + slots - offsets[j]

    def owns(self, idx: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of ``idx`` this rank owns."""
        idx = idx.long()
        if self.rule == "modulo":
            return (idx % self.world_size == self.rank) & (idx >= 0) & (idx < self.num_samples)
        starts, ends, _ = self._tables(idx.device)
        j = torch.searchsorted(starts, idx, right=True) - 1
        return (j >= 0) & (idx < ends[j.clamp(min=0)]) if starts.numel() else torch.zeros_like(idx, dtype=torch.bool)

    def local_slot(self, idx: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Local slots of owned ``idx``; raises :class:`NotOwnedError` naming the first foreign index."""
        idx = idx.long()
        if check and idx.numel():
            owned = self.owns(idx)
            if not bool(owned.all()):
                bad = int(idx[~owned][0])
                raise NotOwnedError(
                    f"rank {self.rank} of {self.world_size} got sample_idx {bad}, which it does not own (rule "
                    f"{self.rule!r}): per-sample state is sharded, so rank r may only see its own samples; use the "
                    "trainer's owner-stable sampler (map-style) or the rank-configured streaming dataset"
                )
        if self.rule == "modulo":
            return idx // self.world_size
        starts, _, offsets = self._tables(idx.device)
        j = (torch.searchsorted(starts, idx, right=True) - 1).clamp(min=0)
        return offsets[j] + idx - starts[j]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._cache:
            self._cache[device] = (self.ranges[:, 0].contiguous().to(device),
                                   self.ranges[:, 1].contiguous().to(device), self._offsets.contiguous().to(device))
        return self._cache[device]

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "num_samples": self.num_samples, "world_size": self.world_size}

    def __repr__(self) -> str:
        return (f"SampleOwnership(rule={self.rule!r}, num_samples={self.num_samples}, rank={self.rank}/"
                f"{self.world_size}, num_local={self.num_local})")
