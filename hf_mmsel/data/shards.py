"""Shard manifest and rank assignment for WebDataset ``.tar`` and parquet shards.

A pool of N image-text pairs stored as shards gets stable integer ids from a :class:`ShardManifest`:
``sample_idx = offset[shard] + position`` in ``[0, N)``, shard order = sorted paths. Counts come from tar
member headers (no decode) or parquet metadata; every shard's member list is hashed (``members_sha256``) so a
changed shard is refused instead of silently renumbering the pool. The original ``__key__`` travels with every
row (``key``) for outputs; keys are never parsed. The shard layout is :mod:`~hf_mmsel.data.shard_format`, the
reader :mod:`~hf_mmsel.data.shard_reader`, the writers :mod:`~hf_mmsel.data.shard_writer`.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .shard_format import SHARD_SUFFIXES, hash_tar_member, parquet_key_column, shard_format, tar_sample_groups

MANIFEST_FILENAME = "manifest.json"

__all__ = [
    "BAD_SAMPLE_POLICIES", "CAPTION_EXTENSION", "IMAGE_EXTENSIONS", "MANIFEST_FILENAME", "BadSampleError", "ShardEntry",
    "ShardManifest", "assign_shards", "assign_worker_shards", "balance_by_count", "iter_shard", "owned_ranges",
    "resolve_shard_paths", "scan_shard", "write_kept_samples", "write_webdataset_shards",
]



@dataclass
class ShardEntry:
    """One shard: ``sample_idx`` of its rows is ``offset .. offset + count - 1``."""

    path: str
    offset: int
    count: int
    members_sha256: str
    format: str  # "webdataset" | "parquet"
    num_bytes: int = -1

    @property
    def name(self) -> str:
        """The shard's file name without its suffix (``shard-00003``): names per-shard outputs."""
        return Path(self.path).name.rsplit(".", 1)[0]


def _scan_tar(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    count = 0
    with open(path, "rb") as f:
        try:
            for _, members in tar_sample_groups(path, f):
                count += 1
                for info in members:
                    hash_tar_member(h, info)
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar shard ({e})") from e
    return count, h.hexdigest()


def _scan_parquet(path: str) -> tuple[int, str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet data
        raise ValueError(f"{path}: not a readable parquet shard ({e})") from e
    meta = pf.metadata
    h = hashlib.sha256()
    h.update(str(pf.schema_arrow).encode())
    h.update(json.dumps([meta.row_group(i).num_rows for i in range(meta.num_row_groups)]).encode())
    key_column = parquet_key_column(pf.schema_arrow.names)
    if key_column is not None:
        for key in pf.read(columns=[key_column]).column(0).to_pylist():
            h.update(f"{key}\n".encode())
    return int(meta.num_rows), h.hexdigest()


def scan_shard(path: str) -> tuple[int, str]:
    """(number of samples, members_sha256) of one shard, from tar headers or parquet metadata (+ key column)."""
    return _scan_tar(path) if shard_format(path) == "webdataset" else _scan_parquet(path)


def resolve_shard_paths(source: str | os.PathLike | list) -> list[str]:
    """Sorted shard paths of a folder (``*.tar`` / ``*.parquet``, recursively), a glob or an explicit list."""
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
    else:
        source = str(source)
        p = Path(source)
        if p.is_dir():
            paths = [str(q) for q in p.rglob("*") if q.is_file() and q.suffix in SHARD_SUFFIXES]
        elif p.is_file():
            paths = [source]
        else:
            paths = [q for q in globlib.glob(source, recursive=True) if q.endswith(SHARD_SUFFIXES)]
    paths = sorted(os.path.abspath(q) for q in paths)
    if not paths:
        raise ValueError(f"no .tar or .parquet shards found in {source!r}")
    formats = {shard_format(q) for q in paths}
    if len(formats) > 1:
        raise ValueError(f"{source!r} mixes WebDataset and parquet shards; use one format per pool")
    return paths


@dataclass
class ShardManifest:
    """Shards in a fixed order with prefix offsets: the pool's stable ``sample_idx`` in ``[0, num_samples)``."""

    shards: list[ShardEntry]
    num_samples: int
    version: int = 1
    root: str | None = field(default=None, compare=False, repr=False)  # folder relative paths are resolved in

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def build(cls, paths_or_glob_or_dir, *, num_threads: int | None = None) -> ShardManifest:
        """Count and hash every shard (tar headers / parquet metadata; images are never decoded)."""
        paths = resolve_shard_paths(paths_or_glob_or_dir)
        if num_threads is None:
            num_threads = min(8, len(paths))
        if num_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(num_threads) as pool:
                scans = list(pool.map(scan_shard, paths))
        else:
            scans = [scan_shard(p) for p in paths]
        shards, offset = [], 0
        for path, (count, digest) in zip(paths, scans):
            shards.append(ShardEntry(path, offset, count, digest, shard_format(path), os.path.getsize(path)))
            offset += count
        if offset == 0:
            raise ValueError(f"the shards of {paths_or_glob_or_dir!r} hold no samples")
        return cls(shards=shards, num_samples=offset)

    def to_dict(self, relative_to: str | None = None) -> dict[str, Any]:
        shards = []
        for s in self.shards:
            d = asdict(s)
            if relative_to is not None:
                rel = os.path.relpath(s.path, relative_to)
                if not rel.startswith(".."):
                    d["path"] = rel
            shards.append(d)
        return {"version": self.version, "num_samples": self.num_samples, "shards": shards}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``manifest.json`` atomically; shard paths inside its folder are stored relative to it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(relative_to=str(path.parent.resolve())), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardManifest:
        path = Path(path)
        data = json.loads(path.read_text())
        if data.get("version") != 1:
            raise ValueError(f"{path}: unsupported manifest version {data.get('version')!r} (this code reads 1)")
        root = str(path.parent.resolve())
        shards = []
        for d in data["shards"]:
            p = d["path"] if os.path.isabs(d["path"]) else os.path.normpath(os.path.join(root, d["path"]))
            shards.append(ShardEntry(**{**d, "path": p}))
        manifest = cls(shards=shards, num_samples=int(data["num_samples"]), version=1, root=root)
        manifest._check_offsets(path)
        return manifest

    def _check_offsets(self, where) -> None:
        offset = 0
        for s in self.shards:
            if s.offset != offset:
                raise ValueError(f"{where}: shard {s.path} has offset {s.offset}, expected {offset}")
            offset += s.count
        if offset != self.num_samples:
            raise ValueError(f"{where}: num_samples is {self.num_samples} but the shards hold {offset}")

    @classmethod
    def load_or_build(
        cls, source, manifest_path: str | os.PathLike | None = None, *, verify: bool | str = "size"
    ) -> ShardManifest:
        """Reuse ``manifest_path`` (default: ``manifest.json`` next to the shards) or build and save it.

        A reused manifest must match the shards: the same files and, with ``verify="size"`` (default, one
        ``stat`` per shard) the same byte sizes, with ``verify="members"`` (or ``True``; re-reads every tar header:
        slow for a web-scale pool) the same member lists; otherwise ``ValueError`` naming the changed shard.
        Every full read of a shard by :func:`iter_shard` re-checks its member hash anyway. A new manifest is
        written to ``manifest_path``, else next to the shards (a read-only shard folder needs ``manifest_path``).
        """
        paths = resolve_shard_paths(source)
        if manifest_path is None:
            manifest_path = Path(os.path.commonpath([os.path.dirname(p) for p in paths])) / MANIFEST_FILENAME
        manifest_path = Path(manifest_path)
        if manifest_path.is_file():
            manifest = cls.load(manifest_path)
            mode = {True: "members", False: "none"}.get(verify, verify)
            if mode not in ("size", "members", "none"):
                raise ValueError(f"verify must be 'size', 'members' or 'none', got {verify!r}")
            if mode != "none":
                manifest.verify(paths, members=mode == "members", where=manifest_path)
            return manifest
        manifest = cls.build(paths)
        try:
            manifest.save(manifest_path)
        except OSError as e:
            raise OSError(
                f"cannot write the shard manifest to {manifest_path} ({e}); pass manifest_path= "
                "(--manifest_path) pointing into a writable folder such as the output_dir"
            ) from e
        manifest.root = str(manifest_path.parent.resolve())
        return manifest

    def verify(self, paths: list[str] | None = None, *, members: bool = True, where=None) -> None:
        """Refuse (``ValueError``) a manifest whose shards no longer match the files on disk."""
        where = where or "manifest"
        listed = [s.path for s in self.shards]
        if paths is not None and sorted(paths) != sorted(listed):
            added = sorted(set(paths) - set(listed))
            missing = sorted(set(listed) - set(paths))
            raise ValueError(
                f"{where} does not match the shards on disk (added: {added[:5]}, missing: {missing[:5]}): "
                "sample ids would change; build a new manifest (delete it or pass another manifest_path)"
            )
        for s in self.shards:
            if not os.path.isfile(s.path):
                raise ValueError(f"{where}: shard {s.path} is missing")
            if not members and s.num_bytes >= 0 and os.path.getsize(s.path) != s.num_bytes:
                raise ValueError(
                    f"{where}: shard {s.path} changed since the manifest was built ({s.num_bytes} -> "
                    f"{os.path.getsize(s.path)} bytes); sample ids would change: build a new manifest (delete it "
                    "or pass another manifest_path)"
                )
            if members:
                count, digest = scan_shard(s.path)
                if (count, digest) != (s.count, s.members_sha256):
                    raise ValueError(
                        f"{where}: shard {s.path} changed since the manifest was built (samples {s.count} -> "
                        f"{count}, members_sha256 differs: {digest != s.members_sha256}); sample ids would "
                        "change: build a new manifest (delete it or pass another manifest_path)"
                    )

    # ------------------------------------------------------------------ ids
    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest content (shard names, counts, member hashes): independent of the folder."""
        content = [(Path(s.path).name, s.offset, s.count, s.members_sha256, s.format) for s in self.shards]
        return hashlib.sha256(json.dumps([self.version, self.num_samples, content]).encode()).hexdigest()

    @property
    def counts(self) -> np.ndarray:
        return np.asarray([s.count for s in self.shards], dtype=np.int64)

    def shard_of(self, sample_idx) -> np.ndarray:
        """Shard index of every ``sample_idx`` (vectorised)."""
        offsets = np.asarray([s.offset for s in self.shards], dtype=np.int64)
        return np.searchsorted(offsets, np.asarray(sample_idx, dtype=np.int64), side="right") - 1

    def __len__(self) -> int:
        return self.num_samples


# ---------------------------------------------------------------------------------------- assignment
def balance_by_count(counts: list[int], ids: list[int], bins: int) -> list[list[int]]:
    """Largest shard first to the least-loaded bin (ties: lower shard id, lower bin); ids sorted per bin."""
    loads = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(ids, key=lambda j: (-counts[j], j)):
        b = min(range(bins), key=lambda k: (loads[k], k))
        out[b].append(i)
        loads[b] += counts[i]
    return [sorted(b) for b in out]


def assign_shards(manifest: ShardManifest, world_size: int) -> list[list[int]]:
    """Shard ids per rank, balanced by sample count, deterministic in (manifest, world_size).

    Unlike ``datasets.distributed.split_dataset_by_node`` this also splits by shard when the shard count is not
    a multiple of ``world_size`` (5 shards over 2 ranks: 3 + 2). Needs at least one shard per rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(manifest.shards) < world_size:
        raise ValueError(
            f"{len(manifest.shards)} shards cannot be split over {world_size} ranks: every rank needs at least "
            "one shard (re-shard the pool into more, smaller shards)"
        )
    counts = [s.count for s in manifest.shards]
    return balance_by_count(counts, list(range(len(counts))), world_size)


def assign_worker_shards(manifest: ShardManifest, shard_ids: list[int], num_workers: int) -> list[list[int]]:
    """Split one rank's shards over its dataloader workers (same greedy rule)."""
    workers = max(1, num_workers)
    if len(shard_ids) < workers:
        raise ValueError(
            f"this rank owns {len(shard_ids)} shards, fewer than its {workers} dataloader workers: use "
            f"dataloader_num_workers <= {len(shard_ids)} or more, smaller shards"
        )
    counts = [s.count for s in manifest.shards]
    return balance_by_count(counts, list(shard_ids), workers)


def owned_ranges(manifest: ShardManifest, rank: int, world_size: int):
    """Half-open ``sample_idx`` ranges ``[n, 2]`` (LongTensor) of the shards rank ``rank`` owns."""
    import torch

    ids = assign_shards(manifest, world_size)[rank]
    ranges = [(manifest.shards[i].offset, manifest.shards[i].offset + manifest.shards[i].count) for i in ids]
    return torch.tensor(ranges, dtype=torch.long).reshape(-1, 2)


# The reader, writer and layout names, importable from here as before the split.
from .shard_format import CAPTION_EXTENSION, IMAGE_EXTENSIONS, BadSampleError  # noqa: E402
from .shard_reader import BAD_SAMPLE_POLICIES, iter_shard  # noqa: E402
from .shard_writer import write_kept_samples, write_webdataset_shards  # noqa: E402
