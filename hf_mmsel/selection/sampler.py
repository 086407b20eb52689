"""``SelectingBatchSampler``: selection before loading (``selection_in_sampler``, docs/design.md, Scale §D).

It draws the same candidate batches as :class:`~hf_mmsel.state.OwnerStableBatchSampler` (candidate batch
``b = pass * batches_per_pass + j``, rows owned by this rank, ``candidate_batch_size`` B), asks the selection for the keep decision of batch
``b`` from the stored last-visit state as of step ``b - L`` (``select(sample_idx, b, pass)``, e.g.
:meth:`~hf_mmsel.selection.SelectionHook.select_candidates`) and yields only the ``k`` kept rows: the DataLoader
never reads, decodes or transforms a rejected pair. Iterated in the main process (a ``batch_sampler``), so the
selection reads the trainer's live state; the lag makes the result independent of ``num_workers`` and prefetch.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..state.sampler import OwnerStableBatchSampler

__all__ = ["SelectingBatchSampler"]


class SelectingBatchSampler(OwnerStableBatchSampler):
    """Owner-stable candidate batches of ``B`` rows, of which only the selected ``k`` are yielded."""

    def __init__(self, sample_idx: torch.Tensor, batch_size: int, *, kept_size: int,
                 select: Callable | None = None, **kwargs) -> None:
        super().__init__(sample_idx, batch_size, **kwargs)
        if not 1 <= int(kept_size) <= batch_size:
            raise ValueError(f"kept_size must be in [1, {batch_size}], got {kept_size}")
        # what a batch of this sampler holds (accelerate's BatchSamplerShard yields only batches of batch_size)
        self.batch_size = int(kept_size)
        self.row_sample_idx = torch.as_tensor(sample_idx, dtype=torch.long).flatten()
        self.select = select  # (sample_idx [B], candidate batch b, pass) -> local keep indices [k]

    def __iter__(self) -> Iterator[list[int]]:
        if self.select is None:
            raise RuntimeError("SelectingBatchSampler.select is not set (the trainer sets it when it builds its hooks)")
        for j, rows in enumerate(super().__iter__()):
            rows = torch.tensor(rows, dtype=torch.long)
            step = self.epoch * self.num_batches + j
            keep = self.select(self.row_sample_idx[rows], step, self.epoch).cpu()
            if keep.numel() != self.batch_size:
                raise RuntimeError(f"the selection kept {keep.numel()} pairs of candidate batch {step}, the sampler "
                                   f"yields {self.batch_size} (same k on every rank)")
            yield rows[keep].tolist()
