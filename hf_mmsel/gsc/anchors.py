"""A bank of confident-clean anchor pairs for GSC structure profiles (docs/design.md, GSC §12.4 item 2b).

The bank is a first-in-first-out queue of detached ``(v_k, u_k)`` embedding pairs with their dataset index.
Pairs enter only if their GSC weight ``w`` is at least ``min_weight``; when a batch offers more candidates than
the bank holds, the highest-priority ones (``w`` by default, e.g. ``w·p``) win. Scoring every batch against the
same set of anchors makes consistency scores comparable across batches and keeps the cost at O(B·M·d) however
large the batch. Anchor weights are looked up from the current buffers at use time (``anchors(weight_table)``).
"""

from __future__ import annotations

import torch


class AnchorBank:
    """FIFO queue of ``size`` detached anchor pairs of dimension ``dim``."""

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        min_weight: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if size <= 0 or dim <= 0:
            raise ValueError(f"AnchorBank needs size > 0 and dim > 0, got size={size}, dim={dim}")
        self.size, self.dim, self.min_weight = size, dim, min_weight
        self.image_embeds = torch.zeros(size, dim, device=device, dtype=dtype)
        self.text_embeds = torch.zeros(size, dim, device=device, dtype=dtype)
        self.weights = torch.zeros(size, device=device, dtype=dtype)
        self.sample_idx = torch.full((size,), -1, device=device, dtype=torch.long)
        self.pointer = torch.zeros((), dtype=torch.long)  # next slot to overwrite
        self.count = torch.zeros((), dtype=torch.long)  # filled slots

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def update(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        weights: torch.Tensor,
        sample_idx: torch.Tensor,
        priority: torch.Tensor | None = None,
    ) -> int:
        """Enqueue the pairs with ``weights >= min_weight`` (highest ``priority`` first); returns how many."""
        if image_embeds.shape[-1] != self.dim or text_embeds.shape[-1] != self.dim:
            raise ValueError(
                f"AnchorBank holds {self.dim}-d embeddings, got {image_embeds.shape[-1]}-d images and "
                f"{text_embeds.shape[-1]}-d texts"
            )
        keep = (weights >= self.min_weight).nonzero().flatten()
        if keep.numel() == 0:
            return 0
        rank = (weights if priority is None else priority)[keep]
        order = torch.sort(rank, descending=True, stable=True).indices[: self.size]
        keep = keep[order]
        n = keep.numel()
        slots = (int(self.pointer) + torch.arange(n)) % self.size
        slots = slots.to(self.image_embeds.device)
        dev = self.image_embeds.device
        keep_dev = keep.to(image_embeds.device)
        self.image_embeds[slots] = image_embeds.detach()[keep_dev].to(dev, self.image_embeds.dtype)
        self.text_embeds[slots] = text_embeds.detach()[keep_dev].to(dev, self.text_embeds.dtype)
        self.weights[slots] = weights.detach()[keep].to(dev, self.weights.dtype)
        self.sample_idx[slots] = sample_idx.detach()[keep.to(sample_idx.device)].to(dev, torch.long)
        self.pointer.fill_((int(self.pointer) + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))
        return n

    def anchors(
        self, weight_table: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_embeds, text_embeds, weights, sample_idx)`` of the filled slots. With ``weight_table``
        (the length-N buffer of current GSC weights), weights are the anchors' current ``w``."""
        n = len(self)
        idx = self.sample_idx[:n]
        weights = self.weights[:n] if weight_table is None else weight_table[idx].to(self.weights)
        return self.image_embeds[:n], self.text_embeds[:n], weights, idx

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "image_embeds": self.image_embeds.clone(),
            "text_embeds": self.text_embeds.clone(),
            "weights": self.weights.clone(),
            "sample_idx": self.sample_idx.clone(),
            "pointer": self.pointer.clone(),
            "count": self.count.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise KeyError(f"AnchorBank state is missing {missing}")
        for key, current in expected.items():
            if tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(
                    f"AnchorBank state {key!r} has shape {tuple(state[key].shape)}, this bank expects "
                    f"{tuple(current.shape)} (size={self.size}, dim={self.dim})"
                )
            getattr(self, key).copy_(state[key])
