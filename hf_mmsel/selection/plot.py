"""End-of-training figure: clean vs noisy CLIPScore distributions per epoch (matplotlib Agg, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["plot_score_distributions"]


def plot_score_distributions(histograms: Sequence[torch.Tensor], epochs: Sequence[int], path: str | Path) -> Path:
    """Write a PNG with one panel per recorded epoch; ``histograms[i]`` is ``[2 (clean, noisy), bins]`` counts
    of the CLIPScore ``s = 100*max(cos, 0)`` over [0, 100] of the pairs scored in epoch ``epochs[i]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(histograms) == 0:
        raise ValueError("no score histograms recorded (the strategy never ran a scoring forward)")
    n = len(histograms)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows + 0.9), squeeze=False, sharex=True,
                             sharey=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, hist, epoch in zip(axes.flat, histograms, epochs):
        bins = hist.shape[-1]
        centres = (torch.arange(bins) + 0.5) * (100.0 / bins)
        for row, (label, colour) in enumerate((("clean", "tab:blue"), ("noisy", "tab:red"))):
            counts = hist[row].float()
            if counts.sum() > 0:
                ax.step(centres.numpy(), (counts / counts.sum()).numpy(), where="mid", color=colour, label=label)
        ax.set_title(f"epoch {epoch} ({int(hist.sum())} pairs scored)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2, frameon=False)
    fig.suptitle("CLIPScore of clean vs noisy pairs, per epoch", fontsize=10, x=0.01, ha="left")
    fig.supxlabel("CLIPScore 100*max(cos, 0)", fontsize=9)
    fig.supylabel("fraction of pairs", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
