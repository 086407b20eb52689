"""``LogWindow``: the trainer's step logs (tensors, no host sync per step) averaged over a logging window and
over ranks (one collective), read when ``Trainer.log`` writes the loss."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["LogWindow"]


class LogWindow:
    """Sums and counts of scalar step logs since the last :meth:`means`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, torch.Tensor | float]) -> None:
        for name, value in logs.items():
            value = torch.as_tensor(value).detach().float().reshape(())
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def __bool__(self) -> bool:
        return bool(self.sums)

    def means(self, device: torch.device, dist=None) -> dict[str, float]:
        """Each name's mean over the window, averaged over ranks with ``dist`` (the same names on every rank);
        empties the window."""
        names = sorted(self.sums)
        means = torch.stack([self.sums[n].to(device) / self.counts[n] for n in names])
        if dist is not None and dist.world_size > 1:
            means = dist.gather(means[None]).mean(0)  # one collective
        self.sums, self.counts = {}, {}
        return {n: round(float(v), 6) for n, v in zip(names, means.tolist())}
