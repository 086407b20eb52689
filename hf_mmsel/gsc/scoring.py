"""One-pass GSC clean probability for a whole dataset (curation; docs/design.md, GSC §4, §12.4 items 1-3).

The training-time GSC hook scores each pair inside its own training batch and smooths the scores over epochs.
For curation, a trained model embeds all N pairs once (no grad) and this module scores them in one go:

1. ``p_i``: cross-modal positive-pair probability (docs/design.md, GSC §3 step 3) inside chunks of ``chunk_size`` pairs
   drawn by a seeded permutation (like GSC's random training batches; chunk sizes differ by at most one);
2. ``c_i``: structure consistency against ONE fixed set of M anchor pairs drawn with ``seed`` (self excluded), so every
   pair is measured in the same reference frame (docs/design.md, GSC §12.4 item 2a). The sigmoid map's centre ``mu`` is
   the mean valid cosine over *all* rows (per modality), so the result does not depend on how rows are chunked. Default
   profile settings: row-centred profiles (Pearson) and sigmoid temperature 0.1, compared by the validation rSum of
   models trained on the kept pairs (``hf-mmsel benchmark-downstream``, docs/results.md); the variants (centring, t,
   posterior of ``p``) tie there within the seed spread, so the calibrated defaults stay (a threshold of 0.5 then means
   "more likely clean than noisy"). Confident anchors (the M cleanest pairs of a first round) gave less contrast than
   random anchors: they cluster, and the profiles lose contrast;
3. ``π_i``: posterior of the higher-mean component of a 2-component GMM on min-max normalised ``c`` (docs/design.md, GSC
§4);
4. ``clean_prob = min(π, P)`` as GSC's ``w = min(EMA_pred, EMA_topo)`` with a single "epoch": ``P`` is raw ``p``
   (``prob_posterior=False``, GSC exactly) or, by default, the GMM posterior of ``p`` (the deviation of docs/design.md,
   GSC §12.1 also offered by :meth:`GSCBuffers.epoch_update`): raw ``p`` is small for clean pairs whenever a chunk holds
   near-duplicate captions or the logit scale is high, which would read as noise.

Everything is a deterministic function of the embeddings and ``seed`` (no communication, no global RNG):
scoring the gathered embeddings of an N-process run gives exactly the single-process result.
Cost: O(N·chunk·d) for ``p``, O(N·M·d) for ``c``; memory O(chunk·max(chunk, M)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import PairLoss, SigmoidPairLoss, SoftmaxPairLoss
from .buffers import gmm_clean_posterior
from .structure import StructureConfig, StructureProfiles, positive_map, structure_consistency

__all__ = ["DEFAULT_STRUCTURE", "anchor_consistency", "chunked_positive_probability", "gsc_clean_probability",
           "mean_anchor_cosine"]

DEFAULT_STRUCTURE = StructureConfig(similarity="sigmoid", temperature=0.1, centered=True)


def _permuted_chunks(n: int, chunk_size: int, seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into ``ceil(n / chunk_size)`` near-equal chunks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return list(torch.tensor_split(order, max(1, -(-n // chunk_size))))


@torch.no_grad()
def chunked_positive_probability(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float | torch.Tensor, *,
    chunk_size: int = 128, seed: int = 0, pair_loss: PairLoss | None = None,
) -> torch.Tensor:
    """``pair_loss.positive_prob`` inside seeded random chunks (default :class:`~hf_mmsel.losses.SoftmaxPairLoss`:
    ``p_i = ½(softmax(S_i·)_i + softmax(S_·i)_i)`` with ``S = scale·V Uᵀ``). Embeddings must be L2-normalised;
    returns float32 [N] on the embeddings' device."""
    loss = pair_loss if pair_loss is not None else SoftmaxPairLoss()
    n = image_embeds.shape[0]
    scale = float(logit_scale)
    p = torch.empty(n, dtype=torch.float32, device=image_embeds.device)
    for idx in _permuted_chunks(n, chunk_size, seed):
        idx = idx.to(image_embeds.device)
        v, u = image_embeds[idx].float(), text_embeds[idx].float()
        p[idx] = loss.positive_prob(v, u, scale)
    return p


def mean_anchor_cosine(embeds: torch.Tensor, anchor_idx: torch.Tensor, row_chunk: int) -> torch.Tensor:
    """Mean of ``cos(x_i, x_k)`` over all rows i and anchors k with i != k (the sigmoid map's centre)."""
    anchors = embeds[anchor_idx].float()
    total = torch.zeros((), dtype=torch.float64, device=embeds.device)
    count = 0
    for start in range(0, embeds.shape[0], row_chunk):
        rows = torch.arange(start, min(start + row_chunk, embeds.shape[0]), device=embeds.device)
        cos = embeds[rows].float() @ anchors.T
        valid = rows.reshape(-1, 1) != anchor_idx.reshape(1, -1)
        total += (cos * valid).sum(dtype=torch.float64)
        count += int(valid.sum())
    return (total / max(count, 1)).float()


@torch.no_grad()
def anchor_consistency(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, anchor_idx: torch.Tensor,
    anchor_weights: torch.Tensor | None = None, *, structure: StructureConfig | None = None, row_chunk: int = 4096,
    mu: tuple[torch.Tensor, torch.Tensor] | None = None, num_rows: int | None = None,
) -> torch.Tensor:
    """Structure consistency ``c_i = cos(Ã_i, C̃_i)`` of every pair against the anchor pairs ``anchor_idx``
    (rows of the same embeddings; a pair is never its own anchor). Float32 [N].

    Streamed scoring (:mod:`hf_mmsel.curation`) passes the sigmoid centres ``mu = (mu_image, mu_text)`` of its
    fixed anchor set and scores only the first ``num_rows`` rows (the anchors are appended after them)."""
    structure = structure or DEFAULT_STRUCTURE
    device = image_embeds.device
    anchor_idx = anchor_idx.to(device).long()
    m = anchor_idx.numel()
    weights = torch.ones(m, device=device) if anchor_weights is None else anchor_weights.to(device).float()
    if weights.shape != (m,):
        raise ValueError(f"anchor_weights must have shape ({m},), got {tuple(weights.shape)}")
    va, ua = image_embeds[anchor_idx].float(), text_embeds[anchor_idx].float()
    mu_v = mu_u = None
    if mu is not None:
        mu_v, mu_u = mu
    elif structure.similarity == "sigmoid":
        mu_v = mean_anchor_cosine(image_embeds, anchor_idx, row_chunk)
        mu_u = mean_anchor_cosine(text_embeds, anchor_idx, row_chunk)
    fmap = dict(similarity=structure.similarity, temperature=structure.temperature)

    n = image_embeds.shape[0] if num_rows is None else int(num_rows)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, row_chunk):
        rows = torch.arange(start, min(start + row_chunk, n), device=device)
        valid = rows.reshape(-1, 1) != anchor_idx.reshape(1, -1)
        keep = valid.float() * weights.reshape(1, -1)
        image = positive_map(image_embeds[rows].float() @ va.T, valid, mu=mu_v, **fmap) * keep
        text = positive_map(text_embeds[rows].float() @ ua.T, valid, mu=mu_u, **fmap) * keep
        out[rows] = structure_consistency(StructureProfiles(image, text, valid), centered=structure.centered)
    return out


@torch.no_grad()
def gsc_clean_probability(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    num_anchors: int = 512,
    chunk_size: int = 128,
    prob_posterior: bool = True,
    structure: StructureConfig | None = None,
    gmm_max_iter: int = 10,
    gmm_tol: float = 1e-2,
    gmm_reg_covar: float = 5e-4,
    max_fit_samples: int = 200_000,
    seed: int = 0,
    logit_bias: float | torch.Tensor | None = None,
    pair_loss: PairLoss | None = None,
) -> dict[str, torch.Tensor]:
    """GSC clean probability of every pair from one embedding pass (see the module docstring).

    Args:
        image_embeds, text_embeds: [N, D] pair embeddings (normalised here), N >= 2.
        logit_scale: similarity scale ``s`` of ``S = s·V Uᵀ`` for ``p`` (the model's ``exp(logit_scale)``).
        num_anchors: M anchor pairs for the structure profiles (``min(M, N)``).
        chunk_size: pairs per softmax chunk for ``p`` (GSC trains with 128).
        prob_posterior: use the GMM posterior of ``p`` instead of raw ``p`` in the ``min``.
        structure: profile settings (:class:`StructureConfig`; default ``DEFAULT_STRUCTURE``: sigmoid map,
            temperature 0.1, row-centred).
        gmm_*: EM settings of the 2-component GMM (GSC's: 10 iterations, tol 1e-2; 100 / 1e-4 gave a narrow
            high component and lower AUROC on the small test model); ``max_fit_samples``: seeded subsample size.
        seed: seeds the chunk permutation, the random anchors and the GMM subsample.
        logit_bias: a model trained with SigLIP's sigmoid loss: its bias ``b``, short for
            ``pair_loss=SigmoidPairLoss(b)``.
        pair_loss: the model's training loss, whose :meth:`~hf_mmsel.losses.PairLoss.positive_prob` gives ``p``:
            in the seeded chunks when it depends on the batch (``in_batch_positive_prob``, the default softmax
            InfoNCE), else per pair (SigLIP's ``p_i = σ(s·cos_ii + b)``, the model's own match probability).

    Returns float32 [N] tensors on the embeddings' device: ``clean_prob``, ``consistency`` (c),
    ``positive_prob`` (raw p), ``structure_posterior`` (π), ``prob_clean`` (the P that entered the min), and
    ``anchor_idx`` (long [M]).
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must both be [N, D] with the same shape, got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    n = image_embeds.shape[0]
    if n < 2:
        raise ValueError(f"GSC scoring needs at least 2 pairs, got {n}")
    if pair_loss is None:
        pair_loss = SoftmaxPairLoss() if logit_bias is None else SigmoidPairLoss(float(logit_bias))
    elif logit_bias is not None:
        raise ValueError("pass the logit_bias inside pair_loss, not both")
    if num_anchors < 1 or chunk_size < 2:
        raise ValueError(f"need num_anchors >= 1 and chunk_size >= 2, got {num_anchors} and {chunk_size}")
    v = F.normalize(image_embeds.float(), dim=-1)
    u = F.normalize(text_embeds.float(), dim=-1)
    if not (torch.isfinite(v).all() and torch.isfinite(u).all()):
        raise ValueError("embeddings contain NaN or inf")
    structure = structure or DEFAULT_STRUCTURE
    fit = dict(max_iter=gmm_max_iter, tol=gmm_tol, reg_covar=gmm_reg_covar, max_fit_samples=max_fit_samples,
               seed=seed, monotone=True)

    def posterior(x: torch.Tensor) -> torch.Tensor:
        return gmm_clean_posterior(x.double(), **fit)[0].float()

    if pair_loss.in_batch_positive_prob:
        p = chunked_positive_probability(v, u, logit_scale, chunk_size=chunk_size, seed=seed, pair_loss=pair_loss)
    else:  # e.g. the sigmoid loss: p needs no chunks
        p = pair_loss.positive_prob(v, u, float(logit_scale))
    # the GMM sees log p: raw p is heavily right-skewed (most pairs near 1/chunk), so a GMM on it models the few
    # confident pairs as the "clean" component; log p (the softmax margin) is far closer to two Gaussians
    prob_clean = posterior(torch.log(p.clamp_min(1e-30))) if prob_posterior else p
    m = min(int(num_anchors), n)
    anchor_idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1))[:m].to(v.device)
    c = anchor_consistency(v, u, anchor_idx, structure=structure)
    pi = posterior(c)
    clean_prob = torch.minimum(pi, prob_clean)
    return {
        "clean_prob": clean_prob,
        "consistency": c,
        "positive_prob": p,
        "structure_posterior": pi,
        "prob_clean": prob_clean,
        "anchor_idx": anchor_idx,
    }
