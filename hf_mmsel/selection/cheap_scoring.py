"""Cheaper fresh scoring: a smaller image size and FLIP-style patch dropping in the no-grad scoring pass only.

Plain torch (no Trainer import). The trainer uses these helpers through ``score_image_size`` /
``score_patch_drop`` (``ContrastiveTrainingArguments``); training forwards stay exact.

* :func:`resize_for_scoring` — bilinear, antialiased resize of ``pixel_values`` ``[B, C, H, W]`` to ``size``.
* :func:`patch_drop` — a context manager hooking every ViT vision-embeddings module of a model (e.g. CLIP's
  ``model.vision_model.embeddings``): the embeddings output ``[B, 1 + P, D]`` keeps token 0 (CLS) and
  ``max(1, round((1 - rate) * P))`` patch tokens chosen at random per sample (gather); removed on exit.
  Embeddings without a class token (SigLIP) drop among all tokens.
* :func:`spearman` — rank correlation (average ranks for ties), to report how well cheap scores order the
  candidates like exact ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["spearman", "resize_for_scoring", "patch_drop", "vision_embeddings", "num_kept_patches"]


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values getting the mean of their ranks (float64)."""
    x = x.detach().double().flatten().cpu()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks_sorted = torch.arange(1, n + 1, dtype=torch.float64)
    # groups of equal values: the average of their positions
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    num_groups = int(group_id[-1]) + 1 if n else 0
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_id, ranks_sorted)
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_id, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (sums / counts)[group_id]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D score vectors (Pearson correlation of their average ranks).

    NaN when either vector is constant (its ranks have no variance) or has fewer than 2 entries."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs vectors of equal length, got {a.numel()} and {b.numel()}")
    if a.numel() < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        return float("nan")
    return float((ra * rb).sum() / denom)


def resize_for_scoring(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """``pixel_values`` ``[B, C, H, W]`` resized to ``size x size`` (bilinear, antialias); unchanged if already so.

    Computed in float32 and returned in the input dtype."""
    if pixel_values.ndim != 4:
        raise ValueError(f"resize_for_scoring needs [B, C, H, W] pixel_values, got shape {tuple(pixel_values.shape)}")
    size = int(size)
    if size <= 0:
        raise ValueError(f"score_image_size must be > 0, got {size}")
    if tuple(pixel_values.shape[-2:]) == (size, size):
        return pixel_values
    out = F.interpolate(pixel_values.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.to(pixel_values.dtype)


def _is_vit_embeddings(module: torch.nn.Module) -> bool:
    return (type(module).__name__.endswith("VisionEmbeddings") and hasattr(module, "patch_embedding")
            and hasattr(module, "position_embedding"))


def vision_embeddings(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every ViT vision-embeddings module of ``model`` (CLIP/SigLIP ``vision_model.embeddings``; one per network
    of an ensemble); empty for convolutional or other towers."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    return [m for m in inner.modules() if _is_vit_embeddings(m)]


def num_kept_patches(num_patches: int, rate: float) -> int:
    """Patch tokens kept by :func:`patch_drop`: ``max(1, round((1 - rate) * num_patches))``."""
    return max(1, int(round((1.0 - float(rate)) * int(num_patches))))


def _drop_tokens(out: torch.Tensor, rate: float, generator: torch.Generator | None, has_cls: bool) -> torch.Tensor:
    start = 1 if has_cls else 0
    batch, tokens, dim = out.shape
    num_patches = tokens - start
    keep = num_kept_patches(num_patches, rate)
    if keep >= num_patches:
        return out
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    kept = torch.argsort(noise, dim=1)[:, :keep].sort(dim=1).values.to(out.device) + start  # [B, keep]
    patches = torch.gather(out, 1, kept.unsqueeze(-1).expand(batch, keep, dim))
    return torch.cat([out[:, :start], patches], dim=1) if has_cls else patches


@contextlib.contextmanager
def patch_drop(model: torch.nn.Module, rate: float, generator: torch.Generator | None = None) -> Iterator[None]:
    """Within the block, each ViT vision-embeddings output keeps token 0 (CLS) and a random
    ``max(1, round((1 - rate) * P))`` of its ``P`` patch tokens, chosen per sample (FLIP-style); position
    embeddings are added before the drop, so the kept tokens keep their positions. ``rate == 0`` is a no-op.
    Raises ``ValueError`` when the model has no ViT vision embeddings. Hooks are removed on exit."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"score_patch_drop must be in [0, 1), got {rate}")
    modules = vision_embeddings(model)
    if not modules:
        raise ValueError(
            f"score_patch_drop needs a ViT vision tower (a '*VisionEmbeddings' module with patch and position "
            f"embeddings, e.g. CLIPModel.vision_model.embeddings); {type(getattr(model, 'module', model)).__name__} "
            "has none")
    if rate == 0.0:
        yield
        return
    handles = []
    for module in modules:
        has_cls = hasattr(module, "class_embedding")

        def hook(mod, args, out, has_cls=has_cls):
            if not isinstance(out, torch.Tensor) or out.ndim != 3:
                raise TypeError(f"score_patch_drop expected a [B, T, D] embeddings output from "
                                f"{type(mod).__name__}, got {type(out).__name__}")
            return _drop_tokens(out, rate, generator, has_cls)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
