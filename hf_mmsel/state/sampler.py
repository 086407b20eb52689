"""``OwnerStableBatchSampler``: map-style candidate batches drawn only from the samples a rank owns.

Rank ``r`` permutes the dataset rows whose ``sample_idx mod W = r`` with a generator seeded by ``(seed, epoch,
rank)`` (or keeps their order, ``shuffle=False``) and cuts them into batches of ``B``. Every rank yields the same
number of batches, ``floor(min_r |owned_r| / B)`` (``drop_last``: equal ``k`` on every rank); the rows left out of
one pass are covered by the next pass's permutation. Negatives are still gathered from every rank in the loss.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UsageError
from .ownership import SampleOwnership

__all__ = ["OwnerStableBatchSampler", "check_unique_sample_idx"]


def check_unique_sample_idx(sample_idx, *, name: str = "train_dataset") -> None:
    """Raise ``ValueError`` if a ``sample_idx`` occurs twice (e.g. two concatenated datasets, both numbered
    0..N-1): per-sample state is indexed by it, so such rows would silently share one state slot.

    One ``torch.unique`` over the map-style column, at train start. Streams are not checked: their ``sample_idx``
    is the shard manifest's offset + position, unique by construction.
    """
    values, counts = torch.unique(torch.as_tensor(sample_idx).flatten(), return_counts=True)
    repeated = values[counts > 1]
    if repeated.numel():
        shown = ", ".join(str(int(v)) for v in repeated[:5]) + (", ..." if repeated.numel() > 5 else "")
        extra = int((counts[counts > 1] - 1).sum())
        raise ValueError(
            f"{name} has duplicate sample_idx values: {repeated.numel()} id(s) occur more than once ({shown}; "
            f"{extra} extra row(s)), e.g. after concatenating datasets that each number their rows 0..N-1. "
            "Per-sample selection / GSC state is indexed by sample_idx, so those rows would share one state slot. "
            'Re-number the rows first: dataset = dataset.map(lambda _, i: {"sample_idx": i}, with_indices=True) '
            "(or hf_mmsel.data.add_sample_idx(dataset))."
        )


class OwnerStableBatchSampler(Sampler):
    """Batches of dataset row indices whose ``sample_idx`` this rank owns (rule ``modulo``)."""

    def __init__(self, sample_idx: torch.Tensor, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        sample_idx = torch.as_tensor(sample_idx, dtype=torch.long).flatten()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.candidate_batch_size = self.batch_size  # a selecting subclass yields fewer rows (its batch_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
        owner = sample_idx % self.world_size
        self.rows = torch.nonzero(owner == self.rank).flatten()
        counts = torch.bincount(owner, minlength=self.world_size)
        self.num_batches = int(counts.min()) // self.batch_size
        self.dropped_per_pass = int(counts[self.rank]) - self.num_batches * self.batch_size
        if self.num_batches == 0:
            raise UsageError(
                f"every rank needs at least one full candidate batch of {batch_size}: the smallest rank owns "
                f"{int(counts.min())} of {sample_idx.numel()} samples (world size {world_size}); lower "
                "--per_device_train_batch_size or train on more samples"
            )

    @classmethod
    def for_ownership(cls, sample_idx: torch.Tensor, batch_size: int, ownership: SampleOwnership, **kwargs):
        if ownership.rule != "modulo":
            raise ValueError("OwnerStableBatchSampler follows the 'modulo' ownership rule")
        return cls(sample_idx, batch_size, world_size=ownership.world_size, rank=ownership.rank, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.rows
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 4096 + self.rank)
            rows = rows[torch.randperm(rows.numel(), generator=g)]
        size = self.candidate_batch_size
        rows = rows[: self.num_batches * size].reshape(self.num_batches, size)
        for batch in rows.tolist():
            yield batch
