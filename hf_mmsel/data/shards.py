"""Shard manifest, rank assignment and a seeking reader for WebDataset ``.tar`` and parquet shards.

A pool of N image-text pairs stored as shards gets stable integer ids from a :class:`ShardManifest`:
``sample_idx = offset[shard] + position`` in ``[0, N)``, shard order = sorted paths. Counts come from tar
member headers (no decode) or parquet metadata; every shard's member list is hashed (``members_sha256``) so a
changed shard is refused instead of silently renumbering the pool. The original ``__key__`` travels with every
row (``key``) for outputs; keys are never parsed.

WebDataset convention (as ``datasets``' webdataset builder): members of one sample are consecutive and share the
key = file name up to its first dot; ``.jpg|.jpeg|.png|.webp`` is the image, ``.txt`` the caption, an optional
``.json`` may carry ``label`` (and other scalar fields such as ``is_noisy``), ``.cls`` an integer label.
Parquet: image column ``image`` (``{"bytes", "path"}`` struct or binary) or ``jpg``/``png``/..., caption
``caption`` or ``txt``, optional ``label``, key ``__key__`` or ``key``.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FILENAME = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_SHARD_SUFFIXES = (".tar", ".parquet")
_PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
_PARQUET_CAPTION_COLUMNS = ("caption", "txt")
_PARQUET_KEY_COLUMNS = ("__key__", "key")
BAD_SAMPLE_POLICIES = ("raise", "skip")


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


def _shard_format(path: str) -> str:
    if path.endswith(".tar"):
        return "webdataset"
    if path.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: not a shard (expected a .tar WebDataset shard or a .parquet file)")


def _sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: ``dir/000012.seg.png`` -> (``dir/000012``, ``seg.png``)."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_groups(path: str, fileobj) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) of consecutive members sharing a key, reading headers only (data is seeked over)."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        key, members = None, []
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError:
                # a truncated shard ends mid-member: keep what the headers show (that sample reads as
                # truncated, so scan and read agree on the count) and stop
                break
            if info is None:
                break
            if not info.isfile():
                continue
            member_key, _ = _sample_key(info.name)
            if member_key != key and members:
                yield key, members
                members = []
            key = member_key
            members.append(info)
        if members:
            yield key, members


def _hash_update_tar(h, info: tarfile.TarInfo) -> None:
    h.update(f"{info.name}\0{info.size}\n".encode())


def _scan_tar(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    count = 0
    with open(path, "rb") as f:
        try:
            for _, members in _tar_groups(path, f):
                count += 1
                for info in members:
                    _hash_update_tar(h, info)
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar shard ({e})") from e
    return count, h.hexdigest()


def _parquet_key_column(names: list[str]) -> str | None:
    return next((c for c in _PARQUET_KEY_COLUMNS if c in names), None)


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
    key_column = _parquet_key_column(pf.schema_arrow.names)
    if key_column is not None:
        for key in pf.read(columns=[key_column]).column(0).to_pylist():
            h.update(f"{key}\n".encode())
    return int(meta.num_rows), h.hexdigest()


def scan_shard(path: str) -> tuple[int, str]:
    """(number of samples, members_sha256) of one shard, from tar headers or parquet metadata (+ key column)."""
    return _scan_tar(path) if _shard_format(path) == "webdataset" else _scan_parquet(path)


def resolve_shard_paths(source: str | os.PathLike | list) -> list[str]:
    """Sorted shard paths of a folder (``*.tar`` / ``*.parquet``, recursively), a glob or an explicit list."""
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
    else:
        source = str(source)
        p = Path(source)
        if p.is_dir():
            paths = [str(q) for q in p.rglob("*") if q.is_file() and q.suffix in _SHARD_SUFFIXES]
        elif p.is_file():
            paths = [source]
        else:
            paths = [q for q in globlib.glob(source, recursive=True) if q.endswith(_SHARD_SUFFIXES)]
    paths = sorted(os.path.abspath(q) for q in paths)
    if not paths:
        raise ValueError(f"no .tar or .parquet shards found in {source!r}")
    formats = {_shard_format(q) for q in paths}
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
            shards.append(ShardEntry(path, offset, count, digest, _shard_format(path), os.path.getsize(path)))
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
def _greedy(counts: list[int], ids: list[int], bins: int) -> list[list[int]]:
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
    return _greedy(counts, list(range(len(counts))), world_size)


def assign_worker_shards(manifest: ShardManifest, shard_ids: list[int], num_workers: int) -> list[list[int]]:
    """Split one rank's shards over its dataloader workers (same greedy rule)."""
    workers = max(1, num_workers)
    if len(shard_ids) < workers:
        raise ValueError(
            f"this rank owns {len(shard_ids)} shards, fewer than its {workers} dataloader workers: use "
            f"dataloader_num_workers <= {len(shard_ids)} or more, smaller shards"
        )
    counts = [s.count for s in manifest.shards]
    return _greedy(counts, list(shard_ids), workers)


def owned_ranges(manifest: ShardManifest, rank: int, world_size: int):
    """Half-open ``sample_idx`` ranges ``[n, 2]`` (LongTensor) of the shards rank ``rank`` owns."""
    import torch

    ids = assign_shards(manifest, world_size)[rank]
    ranges = [(manifest.shards[i].offset, manifest.shards[i].offset + manifest.shards[i].count) for i in ids]
    return torch.tensor(ranges, dtype=torch.long).reshape(-1, 2)


# ---------------------------------------------------------------------------------------- reader
class BadSampleError(ValueError):
    """A sample that cannot be read: the message names the shard path and the key."""


def _check_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")


def _decode_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # force the decode now so a broken file fails here, with its shard and key
    return image


def _extra_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        if k in ("sample_idx", "key", "image", "caption"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out


def _row_from_members(
    entry: ShardEntry, key: str, data: dict[str, bytes], sample_idx: int, decode_images: bool
) -> dict[str, Any]:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in data), None)
    if image_ext is None:
        raise BadSampleError(
            f"{entry.path}: sample {key!r} has no image member ({'|'.join(IMAGE_EXTENSIONS)}); members: "
            f"{sorted(data)}"
        )
    if CAPTION_EXTENSION not in data:
        raise BadSampleError(f"{entry.path}: sample {key!r} has no caption member '.txt'; members: {sorted(data)}")
    row: dict[str, Any] = {"sample_idx": sample_idx, "key": key}
    if "json" in data:
        try:
            meta = json.loads(data["json"])
        except ValueError as e:
            raise BadSampleError(f"{entry.path}: sample {key!r} has an unreadable .json member ({e})") from e
        if isinstance(meta, dict):
            row.update(_extra_fields(meta))
    if "cls" in data:
        row["label"] = int(data["cls"].decode().strip())
    try:
        row["caption"] = data[CAPTION_EXTENSION].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{entry.path}: sample {key!r} has a caption that is not UTF-8 ({e})") from e
    if decode_images:
        try:
            row["image"] = _decode_image(data[image_ext])
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise BadSampleError(f"{entry.path}: sample {key!r} has an undecodable image .{image_ext} ({e})") from e
    else:
        row["image"] = data[image_ext]
    return row


def _iter_tar(entry: ShardEntry, start: int, on_bad_sample: str, decode_images: bool, stats) -> Iterator[dict]:
    h = hashlib.sha256()
    position = 0
    with open(entry.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            groups = _tar_groups(entry.path, f)
            for key, members in groups:
                for info in members:
                    _hash_update_tar(h, info)
                if position >= start:
                    try:
                        data = {}
                        for info in members:
                            if info.offset_data + info.size > size:
                                raise BadSampleError(
                                    f"{entry.path}: sample {key!r} is truncated (member {info.name} needs "
                                    f"{info.offset_data + info.size} bytes, the shard has {size})"
                                )
                            f.seek(info.offset_data)
                            data[_sample_key(info.name)[1]] = f.read(info.size)
                        row = _row_from_members(entry, key, data, entry.offset + position, decode_images)
                    except BadSampleError as e:
                        if on_bad_sample == "raise":
                            raise
                        _count_bad(stats, e)
                        row = None
                    if row is not None:
                        yield row
                position += 1
        except tarfile.TarError as e:
            raise BadSampleError(f"{entry.path}: unreadable tar after {position} samples ({e})") from e
    _check_complete(entry, position, h.hexdigest())


def _check_complete(entry: ShardEntry, count: int, digest: str) -> None:
    if (count, digest) != (entry.count, entry.members_sha256):
        raise ValueError(
            f"{entry.path} changed since the manifest was built ({entry.count} -> {count} samples, "
            f"members_sha256 differs: {digest != entry.members_sha256}): sample ids would be wrong; rebuild the "
            "manifest"
        )


def _count_bad(stats, error: Exception) -> None:
    if stats is None:
        return
    stats["bad_samples"] = stats.get("bad_samples", 0) + 1
    examples = stats.setdefault("bad_sample_examples", [])
    if len(examples) < 20:
        examples.append(str(error))


def _parquet_columns(entry: ShardEntry, names: list[str]) -> tuple[str, str, str | None]:
    image = next((c for c in _PARQUET_IMAGE_COLUMNS if c in names), None)
    caption = next((c for c in _PARQUET_CAPTION_COLUMNS if c in names), None)
    if image is None or caption is None:
        raise ValueError(
            f"{entry.path}: parquet shards need an image column ({'|'.join(_PARQUET_IMAGE_COLUMNS)}) and a caption "
            f"column ({'|'.join(_PARQUET_CAPTION_COLUMNS)}); columns: {names}"
        )
    return image, caption, _parquet_key_column(names)


def _iter_parquet(entry: ShardEntry, start: int, on_bad_sample: str, decode_images: bool, stats) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(entry.path)
    names = pf.schema_arrow.names
    image_col, caption_col, key_col = _parquet_columns(entry, names)
    extra = [c for c in names if c not in (image_col, caption_col, key_col, "sample_idx")]
    position = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if position + n <= start:  # seek: skip whole row groups without reading them
            position += n
            continue
        table = pf.read_row_group(g).to_pydict()
        for i in range(n):
            if position >= start:
                key = str(table[key_col][i]) if key_col else f"{entry.name}/{position}"
                try:
                    row = _parquet_row(entry, table, i, key, image_col, caption_col, extra, decode_images)
                    row["sample_idx"] = entry.offset + position
                except BadSampleError as e:
                    if on_bad_sample == "raise":
                        raise
                    _count_bad(stats, e)
                    row = None
                if row is not None:
                    yield row
            position += 1
    if position != entry.count:
        raise ValueError(f"{entry.path} changed since the manifest was built ({entry.count} -> {position} rows)")


def _parquet_row(entry, table, i, key, image_col, caption_col, extra, decode_images) -> dict[str, Any]:
    caption = table[caption_col][i]
    if caption is None:
        raise BadSampleError(f"{entry.path}: sample {key!r} has no caption")
    image = table[image_col][i]
    if isinstance(image, dict):
        data = image.get("bytes")
        if data is None and image.get("path"):
            path = image["path"]
            path = path if os.path.isabs(path) else os.path.join(os.path.dirname(entry.path), path)
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise BadSampleError(f"{entry.path}: sample {key!r}: image file {path} unreadable ({e})") from e
    else:
        data = image
    if data is None:
        raise BadSampleError(f"{entry.path}: sample {key!r} has no image")
    row: dict[str, Any] = {"key": key, "caption": str(caption)}
    for c in extra:
        v = table[c][i]
        if isinstance(v, (bool, int, float, str)):
            row[c] = v
    if decode_images:
        try:
            row["image"] = _decode_image(data)
        except Exception as e:
            raise BadSampleError(f"{entry.path}: sample {key!r} has an undecodable image ({e})") from e
    else:
        row["image"] = data
    return row


def iter_shard(
    entry: ShardEntry,
    *,
    start: int = 0,
    on_bad_sample: str = "raise",
    decode_images: bool = True,
    stats: dict | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows ``dict(sample_idx, key, image, caption[, label, ...json fields])`` of one shard from position
    ``start`` on; samples before ``start`` are seeked over (tar headers / parquet row groups), never decoded.

    ``on_bad_sample="raise"``: a truncated member, a missing image or caption member or an undecodable image
    raises :class:`BadSampleError` (a ``ValueError``) naming the shard path and key; ``"skip"`` drops the sample
    (its ``sample_idx`` stays unused) and counts it in ``stats["bad_samples"]``. With ``decode_images=False``
    ``image`` holds the encoded bytes. A shard whose members differ from the manifest raises at its end.
    """
    _check_policy(on_bad_sample)
    if not 0 <= start <= entry.count:
        raise ValueError(f"start must lie in [0, {entry.count}] for {entry.path}, got {start}")
    reader = _iter_tar if entry.format == "webdataset" else _iter_parquet
    return reader(entry, start, on_bad_sample, decode_images, stats)


# ---------------------------------------------------------------------------------------- writer
def _image_bytes(value: Any) -> tuple[bytes, str]:
    """Encoded bytes and extension of a datasets image value (``{"bytes", "path"}``, PIL image or bytes)."""
    from PIL import Image

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()
        value = data
    if isinstance(value, (bytes, bytearray)):
        fmt = (Image.open(io.BytesIO(value)).format or "PNG").lower()
        ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
        if ext in IMAGE_EXTENSIONS:
            return bytes(value), ext
        value = Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), "png"
    raise TypeError(f"cannot write an image of type {type(value).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same rows always give byte-identical shards
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_shards(
    dataset,
    output_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    key_column: str | None = None,
    extra_columns: tuple[str, ...] = ("is_noisy",),
    shard_name: str = "shard-{:05d}.tar",
) -> ShardManifest:
    """Write a map-style ``datasets.Dataset`` as WebDataset shards ``shard-00000.tar, ...`` + ``manifest.json``.

    Each row becomes ``<key>.<png|jpg|...>`` (the stored encoded bytes, re-encoded as PNG only for in-memory
    images), ``<key>.txt`` and, with a label or extra columns present, ``<key>.json``. Keys are
    ``key_column``'s values, else the 9-digit row index. Row order is kept, so ``sample_idx`` of the manifest
    equals the row index. Returns the manifest.
    """
    from datasets import Image as ImageFeature

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    for column in (image_column, caption_column, label_column, key_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"column {column!r} not found; existing columns: {dataset.column_names}")
    if isinstance(dataset.features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    extras = [c for c in extra_columns if c in dataset.column_names and c not in (label_column, key_column)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n = len(dataset)
    for shard, begin in enumerate(range(0, n, samples_per_shard)):
        path = out / shard_name.format(shard)
        tmp = path.with_name(path.name + ".tmp")
        rows = dataset[begin : begin + samples_per_shard]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(len(rows[caption_column])):
                key = str(rows[key_column][i]) if key_column else f"{begin + i:09d}"
                if "." in key.rpartition("/")[2]:
                    raise ValueError(f"key {key!r} contains a dot: WebDataset keys end at the first dot")
                data, ext = _image_bytes(rows[image_column][i])
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.txt", str(rows[caption_column][i]).encode("utf-8"))
                meta = {c: _plain(rows[c][i]) for c in extras}
                if label_column is not None:
                    meta["label"] = int(rows[label_column][i])
                if meta:
                    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        os.replace(tmp, path)
        paths.append(str(path))
    manifest = ShardManifest.build(paths)
    manifest.save(out / MANIFEST_FILENAME)
    manifest.root = str(out.resolve())
    return manifest


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
