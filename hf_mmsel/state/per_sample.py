"""``PerSampleState``: the one sharded container of every hook's per-sample arrays.

Each rank allocates only the slots of the samples it owns (:class:`~hf_mmsel.state.ownership.SampleOwnership`),
in compact dtypes chosen by the hooks (DISSect: ``hist`` float32 + ``seen`` bool = 5 B/sample; GSC: five float16
arrays = 10 B/sample, + a uint8 EMA count with the optional bias-corrected EMA). Hooks register their arrays under a namespace (``"selection.hist"``, ``"gsc.weight"``)
and index them with *global* ``sample_idx``; lookups and updates are local (no collective). ``gather_global``
assembles a full ``[N]`` array on every rank (for diagnostics and final exports only). The state saves, loads and
re-shards every array it holds (``save`` / ``load``), so a hook that adds an array needs nothing else to
checkpoint it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import torch

from .ownership import SampleOwnership

__all__ = ["PerSampleState", "StateNamespace", "gather_global"]


class PerSampleState:
    """Named ``[num_local]`` arrays, indexed by global ``sample_idx`` through the ownership rule."""

    def __init__(self, ownership: SampleOwnership, device: torch.device | str = "cpu") -> None:
        self.ownership = ownership
        self.device = torch.device(device)
        self.arrays: dict[str, torch.Tensor] = {}
        self.fills: dict[str, float] = {}

    @property
    def num_samples(self) -> int:
        return self.ownership.num_samples

    def add(self, name: str, dtype: torch.dtype, fill: float | bool = 0) -> torch.Tensor:
        """Allocate (or return the existing) array ``name`` filled with ``fill``."""
        if name in self.arrays:
            existing = self.arrays[name]
            if existing.dtype != dtype:
                raise ValueError(f"per-sample array {name!r} exists with dtype {existing.dtype}, not {dtype}")
            return existing
        self.arrays[name] = torch.full((self.ownership.num_local,), fill, dtype=dtype, device=self.device)
        self.fills[name] = float(fill)
        return self.arrays[name]

    def namespace(self, prefix: str) -> "StateNamespace":
        return StateNamespace(self, prefix)

    def slots(self, idx: torch.Tensor) -> torch.Tensor:
        return self.ownership.local_slot(idx.to(self.device))

    def save(self, folder: str | os.PathLike, *, replicated: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
             rank_local: Mapping[str, torch.Tensor] | None = None):
        """Write this rank's shard of every array into ``folder/hook_state`` (every rank), then rank 0 the
        ``replicated`` state and ``index.json`` (:func:`~hf_mmsel.state.checkpoint.save_sharded_state`)."""
        from .checkpoint import save_sharded_state

        return save_sharded_state(folder, self, replicated=replicated, meta=meta, rank_local=rank_local)

    def load(self, checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Fill every array from ``checkpoint/hook_state``, re-sharded when it was written by another world size;
        returns ``(index, replicated state)`` (:func:`~hf_mmsel.state.checkpoint.load_sharded_state`)."""
        from .checkpoint import load_sharded_state

        return load_sharded_state(checkpoint, self)

    def nbytes(self) -> int:
        """Bytes of all per-sample arrays on this rank."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.arrays[name]


class StateNamespace:
    """A hook's view of :class:`PerSampleState`: names are prefixed ``"{prefix}."``."""

    def __init__(self, state: PerSampleState, prefix: str) -> None:
        self.state, self.prefix = state, prefix

    @property
    def ownership(self) -> SampleOwnership:
        return self.state.ownership

    @property
    def device(self) -> torch.device:
        return self.state.device

    def add(self, name: str, dtype: torch.dtype, fill: float | bool = 0) -> torch.Tensor:
        return self.state.add(f"{self.prefix}.{name}", dtype, fill)

    def slots(self, idx: torch.Tensor) -> torch.Tensor:
        return self.state.slots(idx)

    def namespace(self, prefix: str) -> "StateNamespace":
        return StateNamespace(self.state, f"{self.prefix}.{prefix}")

    def arrays(self) -> dict[str, torch.Tensor]:
        """This namespace's arrays by their names relative to it (``"bank.hist"`` in namespace ``"0"``)."""
        head = self.prefix + "."
        return {name[len(head):]: t for name, t in self.state.arrays.items() if name.startswith(head)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies (on CPU) of :meth:`arrays`: the per-sample part of a hook's ``state_dict``."""
        return {name: t.detach().cpu().clone() for name, t in self.arrays().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state``'s entries named like this namespace's arrays into them (same shapes required)."""
        for name, t in self.arrays().items():
            if name in state:
                if state[name].shape != t.shape:
                    raise ValueError(f"per-sample array {self.prefix}.{name} has {t.numel()} local samples, the "
                                     f"loaded state {state[name].numel()}: it was saved for another dataset")
                t.copy_(state[name].to(t.device, t.dtype))


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_gather_uneven(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' 1-D (or [n, ...]) tensors of different lengths: counts, pad to the max, all_gather, unpad."""
    import torch.distributed as dist

    world, _ = _world()
    if world == 1:
        return [tensor]
    if tensor.dtype == torch.bool:  # not every backend reduces/gathers bool
        return [t.bool() for t in all_gather_uneven(tensor.to(torch.uint8))]
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    top = max(counts)
    padded = torch.zeros((top, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [t[:n] for t, n in zip(out, counts)]


def gather_global(local: torch.Tensor, ownership: SampleOwnership, fill: float = 0.0) -> torch.Tensor:
    """The full ``[N]`` array on every rank from each rank's ``[num_local]`` slice (one uneven all_gather of
    values plus one of indices). Not for the per-step path: O(N) memory on every rank."""
    world, _ = _world()
    if world != ownership.world_size:
        raise RuntimeError(f"gather_global: the process group has {world} ranks, the ownership {ownership.world_size}")
    out = torch.full((ownership.num_samples,), fill, dtype=local.dtype, device=local.device)
    if world == 1:
        out[ownership.global_indices().to(local.device)] = local
        return out
    idx = ownership.global_indices().to(local.device)
    for i, v in zip(all_gather_uneven(idx), all_gather_uneven(local)):
        out[i] = v
    return out
