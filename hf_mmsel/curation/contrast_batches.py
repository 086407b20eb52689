"""Seeded random contrast batches of a shard as one padded tensor, so a score over many batches is one batched
matmul (used by GSC's ``p`` and by negCLIPLoss)."""

from __future__ import annotations

import torch

__all__ = ["chunk_logits", "seeded_chunks"]


def seeded_chunks(n: int, chunk_size: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks of :func:`hf_mmsel.gsc.scoring.chunked_positive_probability` as a padded ``[C, K]`` index
    (a seeded permutation of ``range(n)`` cut like ``torch.tensor_split``) and its validity mask (``-1`` = pad)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    num_chunks = max(1, -(-n // chunk_size))
    q, r = divmod(n, num_chunks)  # torch.tensor_split: the first r chunks hold q + 1 rows
    width = q + (1 if r else 0)
    j = torch.arange(n)
    big = j < r * (q + 1)
    chunk = torch.where(big, j // (q + 1), r + (j - r * (q + 1)) // max(q, 1))
    pos = torch.where(big, j % (q + 1), (j - r * (q + 1)) % max(q, 1))
    index = torch.full((num_chunks, width), -1, dtype=torch.long)
    index[chunk, pos] = order
    index = index.to(device)
    return index, index >= 0


def chunk_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float, index: torch.Tensor,
                 valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_i2t, S_t2i)``: per chunk ``scale·V Uᵀ`` masked for a softmax over texts (rows) / images (columns)."""
    safe = index.clamp(min=0)
    v, u = image_embeds.float()[safe], text_embeds.float()[safe]  # [C, K, D]
    logits = float(logit_scale) * torch.bmm(v, u.transpose(1, 2))  # [C, K, K]
    neg = torch.finfo(logits.dtype).min
    return logits.masked_fill(~valid[:, None, :], neg), logits.masked_fill(~valid[:, :, None], neg)
