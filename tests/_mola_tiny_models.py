"""Tiny models for the MoLA tests (no hf_mmsel import: also used by fresh subprocesses that must not import it)."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Linear MLP on vectors [N, 8]."""

    def __init__(self, dim: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyConvNet(nn.Module):
    """Conv net on images [N, 3, 8, 8]: stem 3x3, a strided 3x3 conv, a 1x1 conv, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.head(h.mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """ViT-like: tokens [N, T, d] through a pre-norm attention block and an MLP block (Linear on 3-D inputs)."""

    def __init__(self, dim: int = 8, tokens: int = 5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(attn @ v)
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {"mlp": TinyMLP, "conv": TinyConvNet, "vit": TinyViT}[kind]()


def make_input(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 8), "conv": (n, 3, 8, 8), "vit": (n, 5, 8)}[kind]
    return torch.randn(shape, generator=g)


TARGETS = {
    "mlp": ["fc1", "fc2"],
    "conv": ["stem", "conv2", "conv3"],
    "vit": ["qkv", "proj", "fc1", "fc2"],
}
