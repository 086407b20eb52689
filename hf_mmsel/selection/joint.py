"""JEST-style joint selection (Evans et al. 2024, arXiv 2406.17711; docs/design.md, Scale §E): draw the ``k`` kept
pairs of a super-batch in ``n`` chunks, each chunk sampled without replacement with probability proportional to
``exp(c_i / tau)``, ``c_i`` the learnability gain of adding pair ``i`` to the chunks already chosen ``A``.

Joint learnability of a set ``S`` of pairs: ``J(S) = sum_m w_m * L_m(S)`` over the terms ``m`` (learner ``theta``
with ``w = +1``, reference ``theta*`` with ``w = -1`` for ``learnability``; one term for the ablations), where
``L_m(S)`` is model ``m``'s contrastive loss *of the batch S alone* (summed over its pairs):

* **sigmoid** (SigLIP): ``L(S) = sum_{i, j in S} l_ij`` with ``l_ij = -log sigmoid(z_ij (t x_i.y_j + b))``, so
  ``c_i = J(A + {i}) - J(A) = S_ii + sum_{a in A} (S_ia + S_ai)``, exact (``S = sum_m w_m l^m``); the first chunk
  (``A`` empty) uses ``S_ii``. Only the ``B x m`` blocks of each chosen chunk are built (``m = k / n``).
* **softmax** (InfoNCE): ``L(S) = sum_{a in S} l_a(S)``, ``l_a(S)`` the symmetric InfoNCE of ``a`` against the
  negatives in ``S``. ``c_i`` is again the exact gain ``J(A + {i}) - J(A)``: ``i``'s own InfoNCE against
  ``A + {i}`` plus the increase ``softplus(z_ai - R_a)`` (and the text->image twin) of every member's loss from the
  new negative ``i``, with ``R_a`` the member's log-sum-exp over ``A``. The InfoNCE of a single pair is 0, so the
  first chunk instead uses ``first_scores`` (the independent per-pair learnability, negatives = all candidates).
  Blocks of ``B x m`` per chosen chunk (computed once, never ``B x B``).

Each loss computes its own gain (:meth:`hf_mmsel.losses.PairLoss.joint_gain` on the blocks,
:class:`~hf_mmsel.losses.JointBlocks`); this module sums the terms and samples. In both cases the pairs *within*
one chunk are drawn independently of each other (JEST's chunk approximation).
Sampling without replacement uses the Gumbel-top-m trick (``topk(c/tau + G)``, ``G = -log E``, ``E ~ Exp(1)``
drawn from the step's CPU generator), which is sequential softmax sampling without replacement; already chosen
pairs get ``-inf``. The conditioning is over this rank's candidates only (the kept pairs are then contrasted
against all ranks' kept pairs in the training loss, as for every other strategy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import PairEmbeddings
from ..losses import JointBlocks, PairLoss

__all__ = ["JointTerm", "check_joint_chunks", "conditional_gains", "gumbel_noise", "joint_select"]


@dataclass
class JointTerm:
    """One model's contribution ``w * L_m`` to the joint learnability: its embeddings of the candidates (with its
    own logit scale) and its :class:`PairLoss` (sigmoid: its own bias)."""

    weight: float
    embeddings: PairEmbeddings
    loss: PairLoss


def check_joint_chunks(k: int, num_chunks: int, num_candidates: int | None = None) -> int:
    """The chunk size ``m = k / n``; raises ``ValueError`` naming ``selection_joint_chunks`` when ``n`` does not
    divide ``k`` or is out of range."""
    k, n = int(k), int(num_chunks)
    if n < 1:
        raise ValueError(f"selection_joint_chunks must be >= 1, got {n}")
    if n > k:
        raise ValueError(f"selection_joint_chunks = {n} exceeds the number of kept pairs k = {k}")
    if k % n:
        raise ValueError(
            f"selection_joint_chunks = {n} must divide the number of kept pairs k = round(select_rate * B) = {k} "
            f"(each of the n chunks draws k / n pairs)"
        )
    if num_candidates is not None and k > int(num_candidates):
        raise ValueError(f"joint selection keeps k = {k} pairs of only {num_candidates} candidates")
    return k // n


def gumbel_noise(size: int, generator: torch.Generator) -> torch.Tensor:
    """``[size]`` standard Gumbel noise ``-log E``, ``E ~ Exp(1)``, float64 on the CPU (reproducible per step)."""
    e = torch.empty(int(size), dtype=torch.float64).exponential_(generator=generator)
    return -torch.log(e.clamp_min(1e-300))


def _blocks(term: JointTerm) -> JointBlocks:
    emb = term.embeddings
    return JointBlocks(emb.image_embeds, emb.text_embeds, emb.logit_scale)


def conditional_gains(terms: list[JointTerm], chunks: list[torch.Tensor],
                      first_scores: torch.Tensor | None = None,
                      blocks: list[JointBlocks] | None = None) -> torch.Tensor:
    """``c_i = J(A + {i}) - J(A)`` for every candidate (``A`` = the union of ``chunks``; chosen ones included,
    the caller masks them). Softmax with ``A`` empty: ``first_scores`` (module docstring). ``blocks``: the
    per-term logit blocks of earlier calls with a prefix of ``chunks`` (reused and extended in place)."""
    if not terms:
        raise ValueError("joint selection needs at least one loss term")
    loss_type = terms[0].loss.loss_type
    if any(term.loss.loss_type != loss_type for term in terms):
        raise ValueError("all joint-selection terms must use the same loss_type")
    if blocks is None:
        blocks = [_blocks(term) for term in terms]
    total = 0.0
    for term, block in zip(terms, blocks):
        block.extend(chunks)
        gain = term.loss.joint_gain(block)
        if gain is None:  # no gain for an empty A (softmax): the first chunk is drawn by first_scores
            if first_scores is None:
                raise ValueError(f"{loss_type} joint selection needs first_scores for its first chunk")
            return first_scores.float()
        total = total + term.weight * gain
    return total


@torch.no_grad()
def joint_select(terms: list[JointTerm], k: int, num_chunks: int, generator: torch.Generator, *,
                 first_scores: torch.Tensor | None = None, temperature: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` distinct candidate indices in ``num_chunks`` chunks (module docstring).

    Returns ``(keep [k] long, in draw order, entropy)`` with ``entropy`` the mean over chunks of the entropy of
    the chunk's sampling distribution ``softmax(c / tau)`` over the remaining candidates (a diagnostic: near 0 means
    near-greedy draws).
    """
    if not temperature > 0:
        raise ValueError(f"selection_joint_temperature must be > 0, got {temperature}")
    size = terms[0].embeddings.image_embeds.shape[0]
    m = check_joint_chunks(k, num_chunks, size)
    device = terms[0].embeddings.image_embeds.device
    chosen = torch.zeros(size, dtype=torch.bool, device=device)
    chunks: list[torch.Tensor] = []
    entropies = []
    blocks = [_blocks(term) for term in terms]
    for _ in range(int(num_chunks)):
        logits = conditional_gains(terms, chunks, first_scores, blocks).double() / float(temperature)
        logits = logits.masked_fill(chosen, float("-inf"))
        noise = gumbel_noise(size, generator).to(device)
        new = torch.topk(logits + noise, m).indices
        log_p = torch.log_softmax(logits, dim=0)
        entropies.append(-(log_p.exp() * log_p.masked_fill(chosen, 0.0)).sum())
        chosen[new] = True
        chunks.append(new)
    return torch.cat(chunks), torch.stack(entropies).mean().float()
