"""negCLIPLoss (Wang et al., NeurIPS 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning"): the CLIP score of a pair minus a normaliser from its similarities to random contrast pairs.

With ``s_ij = cos(v_i, u_j)``, ``τ = 1 / logit_scale`` and K random batches ``B_k`` containing pair i, the pair's
CLIP loss in batch B is ``ℓ_B(i) = -½ [log softmax_j(s_i·/τ)_i + log softmax_j(s_·i/τ)_i]`` (j over B), and

    negCLIPLoss(i) = -(τ / K) Σ_k ℓ_{B_k}(i) = s_ii - R(i),
    R(i) = (τ / 2K) Σ_k [log Σ_{j∈B_k} exp(s_ij/τ) + log Σ_{j∈B_k} exp(s_ji/τ)].

``R`` is large for an image (or caption) that is close to many others' captions (images): a generic pair whose
CLIP score is high only because it matches everything. The K batches are seeded permutations of the shard cut into
chunks of ``batch_size`` (docs/design.md, Curation §1): deterministic, and independent of who scores the shard.
"""

from __future__ import annotations

import numpy as np
import torch

from .contrast_batches import chunk_logits, seeded_chunks

__all__ = ["neg_clip_loss"]


def batch_seed(seed: int, k: int) -> int:
    """The permutation seed of the k-th batching (k = 0 .. K-1) for a shard seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), 3, int(k)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def neg_clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float, *, batch_size: int = 256,
                  num_batches: int = 10, seed: int = 0) -> torch.Tensor:
    """negCLIPLoss of every pair (float32 [n]; higher = cleaner), from L2-normalised embeddings [n, d].

    ``num_batches`` is the paper's K (10), ``batch_size`` the size of each random contrast batch (pairs of a shard
    smaller than it form one batch)."""
    if logit_scale <= 0:
        raise ValueError(f"negCLIPLoss needs a positive logit scale (1/τ), got {logit_scale}")
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size} and {num_batches}")
    n = image_embeds.shape[0]
    device = image_embeds.device
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for k in range(num_batches):
        index, valid = seeded_chunks(n, batch_size, batch_seed(seed, k), device)
        i2t_logits, t2i_logits = chunk_logits(image_embeds, text_embeds, logit_scale, index, valid)
        log_i2t = i2t_logits.log_softmax(dim=2).diagonal(dim1=1, dim2=2)
        log_t2i = t2i_logits.log_softmax(dim=1).diagonal(dim1=1, dim2=2)
        total[index[valid]] += (0.5 * (log_i2t + log_t2i))[valid].double()
    return (total / (num_batches * float(logit_scale))).float()
