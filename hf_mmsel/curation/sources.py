"""What curation reads: WebDataset / parquet shards through their manifest, or a map-style dataset cut into
virtual shards of ``samples_per_shard`` consecutive rows (named and numbered like
:func:`hf_mmsel.data.write_webdataset_shards` would write them, so both inputs give the same per-shard outputs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_mmsel.data.shards import ShardManifest, iter_shard


@dataclass(frozen=True)
class ScoringShard:
    """One unit of work and of output (``scores/<name>.parquet``): ids ``offset .. offset + count - 1``."""

    index: int
    name: str
    offset: int
    count: int


class ShardedSource:
    """WebDataset or parquet shards of a :class:`~hf_mmsel.data.shards.ShardManifest`."""

    def __init__(self, manifest: ShardManifest):
        self.manifest = manifest
        self.kind = manifest.shards[0].format
        self.num_samples = manifest.num_samples
        names = [s.name for s in manifest.shards]
        if len(set(names)) != len(names):
            raise ValueError("shard file names must be unique (they name the per-shard outputs)")
        self.shards = [ScoringShard(i, s.name, s.offset, s.count) for i, s in enumerate(manifest.shards)]

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def rows(self, shard: int, *, start: int = 0, on_bad_sample: str = "raise", stats: dict | None = None,
             decode_images: bool = True) -> Iterator[dict[str, Any]]:
        return iter_shard(self.manifest.shards[shard], start=start, on_bad_sample=on_bad_sample, stats=stats,
                          decode_images=decode_images)

    def rows_at(self, sample_idx: np.ndarray, *, on_bad_sample: str = "raise") -> list[dict[str, Any]]:
        """Rows of the given ids (seeking to each shard's first requested row); bad ones skipped if asked."""
        out = []
        shard_of = self.manifest.shard_of(sample_idx)
        for shard in np.unique(shard_of):
            wanted = set(int(i) for i in sample_idx[shard_of == shard])
            entry = self.manifest.shards[int(shard)]
            start = min(wanted) - entry.offset
            for row in iter_shard(entry, start=start, on_bad_sample=on_bad_sample, stats={}):
                if row["sample_idx"] in wanted:
                    out.append(row)
                if row["sample_idx"] >= max(wanted):
                    break
        return out


class MapStyleSource:
    """A ``datasets.Dataset`` with the standard columns, scored in virtual shards of consecutive rows."""

    def __init__(self, dataset, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.dataset = dataset
        self.kind = "map"
        self.num_samples = len(dataset)
        self.samples_per_shard = samples_per_shard
        self.shards = [
            ScoringShard(i, f"shard-{i:05d}", begin, min(samples_per_shard, self.num_samples - begin))
            for i, begin in enumerate(range(0, self.num_samples, samples_per_shard))
        ]
        self._has_key = "key" in dataset.column_names

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(["map", self.dataset._fingerprint, self.samples_per_shard]).encode()).hexdigest()

    def _row(self, row: dict[str, Any], i: int) -> dict[str, Any]:
        row = dict(row)
        row["sample_idx"] = i
        row["key"] = str(row["key"]) if self._has_key else f"{i:09d}"
        return row

    def rows(self, shard: int, *, start: int = 0, on_bad_sample: str = "raise", stats: dict | None = None,
             decode_images: bool = True) -> Iterator[dict[str, Any]]:
        s = self.shards[shard]
        part = self.dataset.select(range(s.offset + start, s.offset + s.count))
        for j, row in enumerate(part):
            yield self._row(row, s.offset + start + j)

    def rows_at(self, sample_idx: np.ndarray, *, on_bad_sample: str = "raise") -> list[dict[str, Any]]:
        part = self.dataset.select([int(i) for i in sample_idx])
        return [self._row(row, int(i)) for row, i in zip(part, sample_idx)]
