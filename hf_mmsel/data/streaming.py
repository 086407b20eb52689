"""An infinite, rank- and worker-aware stream of fixed-size batches over manifest shards, with stateless resume.

Layout of the stream (design: docs/design.md, Scale §A):

* rank ``r`` reads only the shards ``assign_shards(manifest, W)[r]`` (greedy by count, handles any shard count
  >= W), and its dataloader worker ``w`` only ``assign_worker_shards(...)[w]`` of those;
* a worker cycles its shards forever; cycle ``c`` visits them in the order of a permutation drawn from
  ``numpy.random.default_rng([seed, rank, w, c])``; inside a shard rows come in stored order (seekable);
* a worker cuts its row stream into consecutive batches of exactly ``batch_size`` rows (crossing shard and
  cycle boundaries), so every batch is full; ``DataLoader(batch_size=None, in_order=True)`` takes them round
  robin, so rank batch ``j`` is worker ``j % nw``'s batch ``j // nw``;
* resume is a pure function of the batches the rank consumed, ``c``: worker ``w`` has produced
  ``ceil((c - w) / nw)`` batches, i.e. ``k·B`` rows, which the manifest counts turn into (cycle, shard,
  offset); the reader seeks there without decoding anything before it.

Exactness needs the same (manifest, world size, num_workers, batch size, seed): :meth:`resume_signature` gives
them for a checkpoint to store and compare. With ``on_bad_sample="skip"`` a skipped row shifts the later rows of
its worker's stream by one; a resume then recomputes positions from raw row counts, so it is exact only while
no sample before the resume point in that cycle was skipped (skip counts are in ``stats``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .shard_reader import check_bad_sample_policy, iter_shard
from .shards import ShardManifest, assign_shards, assign_worker_shards, owned_ranges


class StreamingImageTextDataset(torch.utils.data.IterableDataset):
    """An infinite, rank-aware stream of candidate batches with exactly ``batch_size`` rows each.

    Build it unconfigured (``load_image_text_dataset(source, streaming=True)`` or from a manifest), then call
    :meth:`for_rank`; use it with ``DataLoader(ds, batch_size=None, num_workers=num_workers)``. Each yielded
    batch is ``collate_fn(rows)`` carrying ``sample_idx`` (LongTensor [B]) and ``key`` (list[str]).
    """

    def __init__(
        self,
        manifest: ShardManifest,
        *,
        on_bad_sample: str = "raise",
        decode_images: bool = True,
    ):
        super().__init__()
        check_bad_sample_policy(on_bad_sample)
        self.manifest = manifest
        self.num_samples = manifest.num_samples
        self.on_bad_sample = on_bad_sample
        self.decode_images = decode_images
        self.rank: int | None = None
        self.world_size: int | None = None
        self.batch_size: int | None = None
        self.collate_fn: Callable | None = None
        self.num_workers = 0
        self.seed = 0
        self.consumed_batches = 0
        self.stats: dict[str, Any] = {"bad_samples": 0}

    # ------------------------------------------------------------------ configuration
    def for_rank(
        self,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        collate_fn: Callable,
        num_workers: int = 0,
        seed: int = 0,
    ) -> StreamingImageTextDataset:
        """A copy configured for one rank; raises if the rank's shards cannot feed ``num_workers`` workers."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shard_ids = assign_shards(self.manifest, world_size)[rank]
        assign_worker_shards(self.manifest, shard_ids, num_workers)  # validates num_workers early
        out = copy.copy(self)
        out.rank, out.world_size, out.batch_size = rank, world_size, batch_size
        out.collate_fn, out.num_workers, out.seed = collate_fn, num_workers, seed
        out.consumed_batches = 0
        out.stats = {"bad_samples": 0}
        return out

    def _require_configured(self) -> None:
        if self.rank is None:
            raise RuntimeError("call for_rank(rank=, world_size=, batch_size=, collate_fn=) before iterating")

    def owned_ranges(self) -> torch.LongTensor:
        """Half-open ``sample_idx`` ranges ``[n, 2]`` this rank reads (and owns the state of)."""
        self._require_configured()
        return owned_ranges(self.manifest, self.rank, self.world_size)

    @property
    def batches_per_pass(self) -> int:
        """Batches per rank for one pass over the pool: ``ceil(N / (world_size * batch_size))``."""
        self._require_configured()
        return math.ceil(self.num_samples / (self.world_size * self.batch_size))

    def resume_signature(self) -> dict[str, Any]:
        """What an exact resume needs unchanged: store it in a checkpoint and compare on load."""
        self._require_configured()
        return {
            "manifest_fingerprint": self.manifest.fingerprint,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def set_consumed_batches(self, consumed: int) -> None:
        """Start the next iteration after ``consumed`` batches of this rank (a pure function, no state)."""
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.consumed_batches = int(consumed)

    # ------------------------------------------------------------------ stream layout
    def worker_shards(self, worker: int) -> list[int]:
        self._require_configured()
        shard_ids = assign_shards(self.manifest, self.world_size)[self.rank]
        return assign_worker_shards(self.manifest, shard_ids, self.num_workers)[worker]

    def cycle_order(self, worker: int, cycle: int) -> list[int]:
        """Shard ids of ``worker`` in the order cycle ``cycle`` visits them."""
        shards = self.worker_shards(worker)
        rng = np.random.default_rng([self.seed, self.rank, worker, cycle])
        return [shards[i] for i in rng.permutation(len(shards))]

    def worker_start(self, worker: int) -> tuple[int, int, int]:
        """(cycle, index in the cycle's shard order, row offset in that shard) where ``worker`` resumes."""
        nw = max(1, self.num_workers)
        produced = -(-(self.consumed_batches - worker) // nw) if self.consumed_batches > worker else 0
        rows = produced * self.batch_size
        per_cycle = sum(self.manifest.shards[i].count for i in self.worker_shards(worker))
        cycle, rest = divmod(rows, per_cycle)
        for index, shard in enumerate(self.cycle_order(worker, cycle)):
            count = self.manifest.shards[shard].count
            if rest < count:
                return cycle, index, rest
            rest -= count
        raise AssertionError("unreachable: rest < per_cycle")

    def _rows(self, worker: int) -> Iterator[dict[str, Any]]:
        cycle, index, offset = self.worker_start(worker)
        while True:
            yielded = 0
            for shard in self.cycle_order(worker, cycle)[index:]:
                for row in iter_shard(
                    self.manifest.shards[shard],
                    start=offset,
                    on_bad_sample=self.on_bad_sample,
                    decode_images=self.decode_images,
                    stats=self.stats,
                ):
                    yielded += 1
                    yield row
                offset = 0
            if yielded == 0 and index == 0:
                raise ValueError(
                    f"worker {worker} of rank {self.rank} read a whole cycle of its shards without one good sample "
                    f"({self.stats.get('bad_samples', 0)} bad samples skipped)"
                )
            cycle, index = cycle + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._require_configured()
        info = torch.utils.data.get_worker_info()
        worker, actual = (0, 1) if info is None else (info.id, info.num_workers)
        if actual != max(1, self.num_workers):
            raise RuntimeError(
                f"the dataset was configured for num_workers={self.num_workers} but runs in a DataLoader with "
                f"{actual if info is not None else 0} workers: pass the same number to for_rank and the DataLoader"
            )
        # a DataLoader always starts at its worker 0, but after c consumed batches the next rank batch belongs to
        # stream worker c % nw: DataLoader worker i plays stream worker (i + c) % nw
        worker = (worker + self.consumed_batches) % actual
        batch: list[dict[str, Any]] = []
        for row in self._rows(worker):
            batch.append(row)
            if len(batch) == self.batch_size:
                out = self.collate_fn(batch)
                if isinstance(out, dict):
                    out.setdefault("key", [r["key"] for r in batch])
                    if "sample_idx" not in out:
                        out["sample_idx"] = torch.as_tensor([r["sample_idx"] for r in batch], dtype=torch.long)
                yield out
                batch = []

    def __repr__(self) -> str:
        where = "unconfigured" if self.rank is None else f"rank {self.rank}/{self.world_size}, B={self.batch_size}"
        return f"StreamingImageTextDataset({len(self.manifest.shards)} shards, N={self.num_samples}, {where})"
