"""MoLA-Router gate network (paper §3): one router per adapter, shared by all adapted layers.

``logits s(x) in R^E`` per sample, ``g = softmax(s / T)``; with ``top_k`` only the k largest logits are kept (masked
softmax, i.e. the top-k softmax probabilities renormalised; gradients flow through the kept logits). The official
router is a CIFAR ResNet on the raw image; this one is a cheaper two-conv net for images and an MLP for vectors or
for pooled features of a named module (``router_input="module:<name>"``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def pool_features(features) -> torch.Tensor:
    """Pool a module output to [N, d]: [N, C, H, W] -> mean over H, W; [N, T, d] -> mean over T; ModelOutput or
    tuple -> its ``pooler_output`` if present, else its first tensor."""
    if not isinstance(features, torch.Tensor):
        pooled = getattr(features, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            features = pooled
        elif isinstance(features, (tuple, list)) or hasattr(features, "to_tuple"):
            items = features.to_tuple() if hasattr(features, "to_tuple") else features
            tensors = [t for t in items if isinstance(t, torch.Tensor)]
            if not tensors:
                raise TypeError(f"MoLA router: module output of type {type(features).__name__} holds no tensor.")
            features = tensors[0]
        else:
            raise TypeError(f"MoLA router: cannot pool a module output of type {type(features).__name__}.")
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 2:
        return features
    raise ValueError(f"MoLA router: cannot pool features of shape {tuple(features.shape)} to [N, d].")


def gates_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """``g = softmax(s / T)``; with ``top_k`` the logits outside the top k are masked to -inf before the softmax."""
    scaled = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.softmax(scaled, dim=-1)


class MolaRouter(nn.Module):
    """Gate network: ``kind="conv"`` (images [N, C, H, W]) or ``"mlp"`` (vectors [N, d]; [N, T, d] is mean-pooled)."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        hidden: int = 64,
        kind: str = "mlp",
        temperature: float = 1.0,
        top_k: Optional[int] = None,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "mlp"):
            raise ValueError(f"MolaRouter kind={kind!r} is not valid; choose one of ['conv', 'mlp'].")
        self.kind = kind
        self.temperature = temperature
        self.top_k = top_k
        if kind == "conv":
            width = max(8, hidden // 4)
            self.net = nn.Sequential(
                nn.Conv2d(in_features, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, num_experts),
            )
        else:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits [N, E], gates [N, E])."""
        if not torch.is_floating_point(x):
            raise TypeError(
                f"MoLA router got a {x.dtype} input (token ids?): use router_input='module:<name>' to route on the "
                "features of an early module instead."
            )
        if self.kind == "conv":
            if x.dim() != 4 or x.shape[1] != self.net[0].in_channels:
                raise ValueError(
                    f"MoLA conv router expects images [N, {self.net[0].in_channels}, H, W], got shape "
                    f"{tuple(x.shape)}: set MolaConfig.router_kind ('conv' or 'mlp') and router_in_features."
                )
        else:
            if x.dim() == 4:
                raise ValueError(
                    f"MoLA MLP router got an image batch of shape {tuple(x.shape)}: use "
                    "MolaConfig(router_kind='conv') (or 'auto' with a forward(pixel_values, ...) model)."
                )
            if x.dim() != 2:
                x = pool_features(x)
            if x.shape[-1] != self.net[0].in_features:
                raise ValueError(
                    f"MoLA MLP router expects {self.net[0].in_features} input features, got {x.shape[-1]} "
                    f"(input shape {tuple(x.shape)}): set MolaConfig.router_in_features."
                )
        x = x.to(self.net[0].weight.dtype)
        logits = self.net(x)
        return logits, gates_from_logits(logits, self.temperature, self.top_k)
