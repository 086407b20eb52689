"""Backend-independent checkpoints of the sharded hook state (docs/design.md, Scale §B, §C).

Layout inside ``checkpoint-S/``::

    hook_state/rank00000-of-00002.safetensors   # this rank's per-sample arrays (+ "__owned_ranges__")
    hook_state/rank00001-of-00002.safetensors
    hook_state/replicated.safetensors           # rank 0: hook state that is not per-sample (anchor bank, ...)
    hook_state/index.json                       # rank 0, written last: N, W, rule, step, dtypes, hooks, ...

Every rank writes its own file, then a barrier, then rank 0 writes ``index.json``: a folder without
``index.json`` is incomplete. Loading with the same world size reads the rank's own file; with another world size
the old files are re-sharded (every rank reads the slices it now owns), and the data order changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .ownership import SampleOwnership
from .per_sample import PerSampleState

__all__ = ["HOOK_STATE_DIR", "INDEX_NAME", "FORMAT_VERSION", "IncompleteCheckpointError", "check_checkpoint_complete",
           "save_sharded_state", "load_sharded_state", "load_rank_local", "read_index", "read_global_arrays", "read_hook_state",
           "rank_file_name"]

HOOK_STATE_DIR = "hook_state"
INDEX_NAME = "index.json"
REPLICATED_NAME = "replicated.safetensors"
FORMAT_VERSION = 1
_RANGES_KEY = "__owned_ranges__"
_RANK_LOCAL = "__rank__."  # prefix of per-rank state that is not per sample (e.g. the lagged-view FIFO)


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint folder lacks ``trainer_state.json`` or ``hook_state/index.json`` (e.g. a killed save)."""


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank{rank:05d}-of-{world_size:05d}.safetensors"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_sharded_state(folder: str | os.PathLike, state: PerSampleState, *, replicated: Mapping[str, torch.Tensor],
                       meta: Mapping[str, Any], rank_local: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write this rank's shard, barrier, then (rank 0) ``replicated.safetensors`` and ``index.json``.
    Called on every rank. ``meta`` goes into ``index.json`` (step, hook kinds, manifest fingerprint, ...);
    ``rank_local``: this rank's state that is not per sample, in its own file (:func:`load_rank_local`)."""
    from safetensors.torch import save_file

    own = state.ownership
    folder = Path(folder) / HOOK_STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.arrays.items()}
    if own.rule == "ranges":
        tensors[_RANGES_KEY] = own.ranges.clone()
    tensors.update({_RANK_LOCAL + k: v.detach().cpu().contiguous() for k, v in (rank_local or {}).items()})
    save_file(tensors, str(folder / rank_file_name(own.rank, own.world_size)))
    _barrier()
    if own.rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in replicated.items()}, str(folder / REPLICATED_NAME))
        index = {
            "format_version": FORMAT_VERSION, **own.to_json(),
            "files": [rank_file_name(r, own.world_size) for r in range(own.world_size)],
            "arrays": {name: str(t.dtype).replace("torch.", "") for name, t in state.arrays.items()},
            "fills": state.fills, **dict(meta),
        }
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        tmp.replace(folder / INDEX_NAME)
    _barrier()
    return folder


def read_index(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / HOOK_STATE_DIR / INDEX_NAME
    if not path.is_file():
        raise IncompleteCheckpointError(
            f"{path} not found: {checkpoint} holds no complete ContrastiveTrainer hook state (a save interrupted "
            "before index.json, or a checkpoint of another trainer)"
        )
    return json.loads(path.read_text())


def check_checkpoint_complete(checkpoint: str | os.PathLike) -> None:
    """Raise :class:`IncompleteCheckpointError` naming the previous complete checkpoint when ``checkpoint`` lacks
    ``trainer_state.json`` or ``hook_state/index.json``."""
    checkpoint = Path(checkpoint)
    missing = [name for name in ("trainer_state.json", f"{HOOK_STATE_DIR}/{INDEX_NAME}")
               if not (checkpoint / name).is_file()]
    if not missing:
        return
    previous = None
    parent = checkpoint.parent
    if parent.is_dir():
        def step_of(p: Path) -> int:
            try:
                return int(p.name.rsplit("-", 1)[-1])
            except ValueError:
                return -1
        candidates = sorted((p for p in parent.glob("checkpoint-*") if p.is_dir() and p != checkpoint
                             and 0 <= step_of(p) < step_of(checkpoint)), key=step_of)
        for p in reversed(candidates):
            if (p / "trainer_state.json").is_file() and (p / HOOK_STATE_DIR / INDEX_NAME).is_file():
                previous = p
                break
    hint = (f"resume from the previous complete checkpoint {previous}" if previous is not None
            else "no earlier complete checkpoint exists")
    raise IncompleteCheckpointError(f"checkpoint {checkpoint} is incomplete (missing {', '.join(missing)}): {hint}")


def _file_global_indices(index: Mapping[str, Any], rank: int, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    old = SampleOwnership(index["num_samples"], index["world_size"], rank, rule=index["rule"],
                          ranges=tensors.get(_RANGES_KEY))
    return old.global_indices()


def load_sharded_state(checkpoint: str | os.PathLike, state: PerSampleState, *,
                       allow_reshard: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fill ``state``'s arrays from ``checkpoint/hook_state``; returns ``(index, replicated tensors)``.

    Same world size and rule: the rank's own file. Otherwise every old file is read and the slices this rank now
    owns are copied (``allow_reshard=False``: a ValueError naming both world sizes)."""
    from safetensors.torch import load_file

    index = read_index(checkpoint)
    folder = Path(checkpoint) / HOOK_STATE_DIR
    own = state.ownership
    if int(index["num_samples"]) != own.num_samples:
        raise ValueError(
            f"hook state in {checkpoint} was saved for {index['num_samples']} samples, this run has "
            f"{own.num_samples}: resume on the same dataset"
        )
    missing = sorted(set(state.arrays) - set(index["arrays"]))
    extra = sorted(set(index["arrays"]) - set(state.arrays))
    if missing or extra:
        raise ValueError(
            f"hook state in {checkpoint} does not match this run's hooks: missing {missing}, unexpected {extra} "
            "(resume with the same selection strategy, gsc, gsc_co_training and selection_diagnostics settings)"
        )
    same = int(index["world_size"]) == own.world_size and index["rule"] == own.rule
    if same:
        tensors = load_file(str(folder / rank_file_name(own.rank, own.world_size)))
        if own.rule == "ranges" and not torch.equal(tensors[_RANGES_KEY], own.ranges):
            same = False
        else:
            for name, t in state.arrays.items():
                t.copy_(tensors[name].to(t.device))
    if not same:
        if not allow_reshard:
            raise ValueError(
                f"checkpoint {checkpoint} was written by {index['world_size']} processes, this run has "
                f"{own.world_size}: re-sharding is disabled"
            )
        slots_filled = torch.zeros(own.num_local, dtype=torch.bool)
        for r, name in enumerate(index["files"]):
            tensors = load_file(str(folder / name))
            idx = _file_global_indices(index, r, tensors)
            mine = own.owns(idx)
            if not bool(mine.any()):
                continue
            slots = own.local_slot(idx[mine], check=False)
            slots_filled[slots] = True
            for array_name, t in state.arrays.items():
                t[slots.to(t.device)] = tensors[array_name][mine].to(t.device, t.dtype)
        if own.num_local and not bool(slots_filled.all()):
            raise ValueError(f"re-sharding {checkpoint}: {int((~slots_filled).sum())} owned samples are in no file")
    replicated_path = folder / REPLICATED_NAME
    replicated = load_file(str(replicated_path)) if replicated_path.is_file() else {}
    return index, replicated


def load_rank_local(checkpoint: str | os.PathLike, ownership: SampleOwnership) -> list[dict[str, torch.Tensor]]:
    """The ``rank_local`` state of :func:`save_sharded_state`: ``[this rank's]`` with the same world size and rule,
    else the dicts of every old rank (the caller keeps what it now owns)."""
    from safetensors.torch import load_file

    index = read_index(checkpoint)
    folder = Path(checkpoint) / HOOK_STATE_DIR
    same = int(index["world_size"]) == ownership.world_size and index["rule"] == ownership.rule
    names = [rank_file_name(ownership.rank, ownership.world_size)] if same else list(index["files"])
    out = []
    for name in names:
        tensors = load_file(str(folder / name))
        out.append({k[len(_RANK_LOCAL):]: v for k, v in tensors.items() if k.startswith(_RANK_LOCAL)})
    return out


def read_global_arrays(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every per-sample array of a checkpoint as a full ``[N]`` tensor (one process, no collectives): for
    curation, analysis and tests."""
    from safetensors.torch import load_file

    index = read_index(checkpoint)
    folder = Path(checkpoint) / HOOK_STATE_DIR
    n = int(index["num_samples"])
    out: dict[str, torch.Tensor] = {}
    for r, name in enumerate(index["files"]):
        tensors = load_file(str(folder / name))
        idx = _file_global_indices(index, r, tensors)
        for array_name in index["arrays"]:
            t = tensors[array_name]
            if array_name not in out:
                out[array_name] = torch.full((n,), index["fills"][array_name], dtype=t.dtype)
            out[array_name][idx] = t
    return out


def read_hook_state(checkpoint: str | os.PathLike, kind: str) -> dict[str, torch.Tensor] | None:
    """The state of the first hook of ``kind`` (``"selection"``, ``"gsc"``, ``"gsc_plus"``: the kinds listed in
    ``index.json``) in a checkpoint: its per-sample arrays as full ``[N]`` tensors and its replicated state, by names
    relative to the hook (``"bank.hist"``, ``"buffers.weight"``, ``"buffers.num_updates"``); ``None`` when the
    checkpoint holds no hook of that kind. One process, no collectives (curation, analysis)."""
    from safetensors.torch import load_file

    kinds = list(read_index(checkpoint).get("hooks", []))
    if kind not in kinds:
        return None
    prefix = f"{kinds.index(kind)}."
    replicated_path = Path(checkpoint) / HOOK_STATE_DIR / REPLICATED_NAME
    replicated = load_file(str(replicated_path)) if replicated_path.is_file() else {}
    state = {**read_global_arrays(checkpoint), **replicated}
    return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
