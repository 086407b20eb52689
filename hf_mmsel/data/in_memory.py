"""A cached image-text dataset held as in-memory tensors (fast rows for small benchmarks on CPU)."""

from __future__ import annotations

import torch

__all__ = ["InMemoryPairs"]


class InMemoryPairs(torch.utils.data.Dataset):
    """The cached tensor columns of a ``datasets.Dataset`` held in memory: a row costs a few tensor indexings
    instead of an Arrow-to-tensor conversion of its image (which dominated the step time on CPU)."""

    COLUMNS = ("pixel_values", "input_ids", "attention_mask", "sample_idx", "label", "is_noisy")

    def __init__(self, dataset) -> None:
        names = [c for c in self.COLUMNS if c in dataset.column_names]
        table = dataset.with_format("torch", columns=names)[:]
        self.columns = {name: table[name] for name in names}
        self.length = len(dataset)
        # the same rows as the source Dataset: its fingerprint lets the tower embedding cache key on them
        self._fingerprint = getattr(dataset, "_fingerprint", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices)
        block = {name: column[index] for name, column in self.columns.items()}
        return [{name: block[name][j] for name in block} for j in range(len(indices))]
