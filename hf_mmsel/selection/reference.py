"""Per-sample scores of a fixed reference model for ``reference_clipscore`` (the paper's oracle baseline)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_reference_scores"]


def load_reference_scores(path: str | os.PathLike) -> torch.Tensor:
    """``[N]`` float32 scores from a .safetensors (key ``scores``), .pt/.pth or .npy file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "scores" not in tensors:
            raise KeyError(f"{path} has no 'scores' tensor; keys: {sorted(tensors)}")
        scores = tensors["scores"]
    elif path.suffix in (".pt", ".pth"):
        scores = torch.load(path, weights_only=True)
    elif path.suffix == ".npy":
        import numpy as np

        scores = torch.from_numpy(np.load(path))
    else:
        raise ValueError(f"unsupported reference score file {path.name!r}; use .safetensors, .pt or .npy")
    return torch.as_tensor(scores, dtype=torch.float32).flatten()
