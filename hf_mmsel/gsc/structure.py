"""Intra-modal geometrical structure of image-text pairs (GSC, docs/design.md, GSC §3 steps 3-7 and §12.1).

For a batch of L2-normalised image embeddings ``v_i`` and text embeddings ``u_i`` and a set of M paired anchors
``(v_k, u_k)`` with weights ``w_k``, the *structure profiles* are

    Ã_ik = f(v_i · v_k) · w_k        C̃_ik = f(u_i · u_k) · w_k        (docs/design.md, GSC §3 step 5, §12.1)

with ``f`` a positive monotone map of the cosine. An anchor that is the sample itself is excluded (docs/design.md, GSC
§12.1: ``cos(v_i, v_i) = 1`` is a constant), by masking, which is exactly equivalent to removing the column. From the
profiles:

- structure consistency ``c_i = cos(Ã_i, C̃_i)`` (optionally row-centred: Pearson correlation), §3 step 6;
- structure-matching matrix ``G_ab`` between the image profile of a and the text profile of b, §3 step 7, scaled
  so that its softmax does not saturate when the number of anchors differs from GSC's 128;
- the structure InfoNCE ``ℓ^str_a = -log softmax_b(G_a·)_a`` (image -> text, as in GSC);
- the cross-modal positive-pair probability ``p_i = ½(softmax(S_i·)_i + softmax(S_·i)_i)``, §3 step 3.

All functions are plain torch; costs are O(B·M·d) for the profiles and O(B²·M) for ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

SimilarityMap = Literal["sigmoid", "affine"]
MatchingMode = Literal["cosine", "dot"]

_EPS = 1e-8


@dataclass(frozen=True)
class StructureConfig:
    """How structure profiles, consistency and the structure loss are computed.

    Attributes:
        similarity: ``"sigmoid"``: ``f(x) = sigmoid((x - mu) / temperature)`` with ``mu`` the mean of the valid
            (non-self) cosines of the block (per modality, detached); ``"affine"``: ``f(x) = (1 + x) / 2``.
        temperature: ``t`` of the sigmoid map (docs/design.md, GSC §12.1 suggests ~0.1).
        centered: subtract each profile's mean over its valid anchors before comparing (Pearson correlation).
        matching: ``"cosine"``: ``G_ab = cos(Ã_a, C̃_b) / matching_temperature`` (row-normalised profiles, so
            ``G_aa · matching_temperature = c_a``); ``"dot"``: ``G_ab = Ã_a · C̃_b / matching_temperature`` as in
            GSC (where the temperature is 1 with 128 anchors); ``None`` temperature then means ``M / 10``.
        matching_temperature: temperature of the structure InfoNCE (``None``: 0.1 for cosine, ``M/10`` for dot).
        max_batch_anchors: use at most this many in-batch anchors (the highest-weight ones) so the profile cost
            stays O(B·M·d) for large batches; ``0`` disables in-batch anchors (anchor bank only); ``None``: all.
    """

    similarity: SimilarityMap = "sigmoid"
    temperature: float = 0.1
    centered: bool = False
    matching: MatchingMode = "cosine"
    matching_temperature: float | None = None
    max_batch_anchors: int | None = None

    def __post_init__(self) -> None:
        if self.similarity not in ("sigmoid", "affine"):
            raise ValueError(f"similarity must be 'sigmoid' or 'affine', got {self.similarity!r}")
        if self.matching not in ("cosine", "dot"):
            raise ValueError(f"matching must be 'cosine' or 'dot', got {self.matching!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.matching_temperature is not None and self.matching_temperature <= 0:
            raise ValueError(f"matching_temperature must be > 0, got {self.matching_temperature}")
        if self.max_batch_anchors is not None and self.max_batch_anchors < 0:
            raise ValueError(f"max_batch_anchors must be >= 0 or None, got {self.max_batch_anchors}")


@dataclass
class StructureProfiles:
    """Anchor-weighted profiles ``Ã`` (image side) and ``C̃`` (text side), both (B, M), zero on invalid
    (self) anchors; ``valid`` (B, M) marks the anchors that count for each row."""

    image: torch.Tensor
    text: torch.Tensor
    valid: torch.Tensor


def positive_map(
    cos: torch.Tensor, valid: torch.Tensor, similarity: SimilarityMap, temperature: float,
    mu: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``f(cos)`` of docs/design.md, GSC §12.1, a positive monotone map: ``(1 + cos)/2`` or ``σ((cos - μ)/t)``. The
    sigmoid's centre ``μ`` is, by default, the (detached) mean of the ``valid`` entries, so the map adapts to how
    spread-out the embedding space currently is; one-pass scoring passes a fixed ``mu`` (one frame for every chunk)."""
    if similarity == "affine":
        return (1.0 + cos) / 2.0
    if similarity == "sigmoid":
        if mu is None:
            validf = valid.to(cos.dtype)
            mu = (cos.detach() * validf).sum() / validf.sum().clamp_min(1.0)
        return torch.sigmoid((cos - mu) / temperature)
    raise ValueError(f"similarity must be 'sigmoid' or 'affine', got {similarity!r}")


def self_exclusion_mask(sample_idx: torch.Tensor, anchor_sample_idx: torch.Tensor) -> torch.Tensor:
    """(B, M) bool, True where anchor k is the same dataset sample as row i (to be excluded)."""
    return sample_idx.reshape(-1, 1) == anchor_sample_idx.reshape(1, -1)


def structure_profiles(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    anchor_image_embeds: torch.Tensor,
    anchor_text_embeds: torch.Tensor,
    anchor_weights: torch.Tensor,
    exclude: torch.Tensor | None = None,
    *,
    similarity: SimilarityMap = "sigmoid",
    temperature: float = 0.1,
) -> StructureProfiles:
    """Anchor-weighted intra-modal similarity profiles ``Ã_ik = f(v_i·v_k) w_k``, ``C̃_ik = f(u_i·u_k) w_k``
    (docs/design.md, GSC §3 steps 4-5). Embeddings must be L2-normalised. ``exclude`` (B, M) bool masks self anchors."""
    b, m = image_embeds.shape[0], anchor_image_embeds.shape[0]
    if text_embeds.shape[0] != b or anchor_text_embeds.shape[0] != m or anchor_weights.shape != (m,):
        raise ValueError(
            f"shape mismatch: {b} images vs {text_embeds.shape[0]} texts; {m} anchor images vs "
            f"{anchor_text_embeds.shape[0]} anchor texts and anchor weights of shape {tuple(anchor_weights.shape)}"
        )
    valid = torch.ones(b, m, dtype=torch.bool, device=image_embeds.device)
    if exclude is not None:
        if exclude.shape != (b, m):
            raise ValueError(f"exclude mask must have shape {(b, m)}, got {tuple(exclude.shape)}")
        valid = ~exclude
    w = anchor_weights.detach().to(image_embeds.dtype).reshape(1, m)
    image_profiles = positive_map(image_embeds @ anchor_image_embeds.T, valid, similarity, temperature) * w
    text_profiles = positive_map(text_embeds @ anchor_text_embeds.T, valid, similarity, temperature) * w
    zero = valid.to(image_profiles.dtype)
    return StructureProfiles(image=image_profiles * zero, text=text_profiles * zero, valid=valid)


def _comparable(profiles: torch.Tensor, valid: torch.Tensor, centered: bool) -> torch.Tensor:
    """Profiles ready for a cosine: invalid entries zero; if ``centered``, minus the row mean over valid entries."""
    if not centered:
        return profiles
    validf = valid.to(profiles.dtype)
    mean = profiles.sum(dim=1, keepdim=True) / validf.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (profiles - mean) * validf


def structure_consistency(profiles: StructureProfiles, centered: bool = False) -> torch.Tensor:
    """``c_i = cos(Ã_i, C̃_i)`` (docs/design.md, GSC §3 step 6), or the Pearson correlation when ``centered``; a zero
    profile (e.g. all anchor weights 0) gives ``c_i = 0``, never NaN."""
    a = _comparable(profiles.image, profiles.valid, centered)
    c = _comparable(profiles.text, profiles.valid, centered)
    return F.cosine_similarity(a, c, dim=1, eps=_EPS)


def structure_matching(
    profiles: StructureProfiles,
    *,
    centered: bool = False,
    matching: MatchingMode = "cosine",
    matching_temperature: float | None = None,
) -> torch.Tensor:
    """Structure-matching logits ``G`` (B, B) of docs/design.md, GSC §3 step 7, already divided by the temperature."""
    a = _comparable(profiles.image, profiles.valid, centered)
    c = _comparable(profiles.text, profiles.valid, centered)
    if matching == "cosine":
        tau = 0.1 if matching_temperature is None else matching_temperature
        return F.normalize(a, dim=1, eps=_EPS) @ F.normalize(c, dim=1, eps=_EPS).T / tau
    if matching == "dot":
        tau = max(a.shape[1], 1) / 10.0 if matching_temperature is None else matching_temperature
        return a @ c.T / tau
    raise ValueError(f"matching must be 'cosine' or 'dot', got {matching!r}")


def structure_infonce(matching_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample structure loss ``ℓ^str_a = -log softmax_b(G_a·)_a`` (image -> text, docs/design.md, GSC §3 step 7)."""
    target = torch.arange(matching_logits.shape[0], device=matching_logits.device)
    return F.cross_entropy(matching_logits, target, reduction="none")


def positive_probability(logits_per_image: torch.Tensor) -> torch.Tensor:
    """``p_i = ½(softmax_j(S_i·)_i + softmax_j(S_·i)_i)`` for square image-text logits ``S`` (docs/design.md, GSC §3
    step 3)."""
    i2t = logits_per_image.softmax(dim=1).diagonal()
    t2i = logits_per_image.softmax(dim=0).diagonal()
    return 0.5 * (i2t + t2i)
