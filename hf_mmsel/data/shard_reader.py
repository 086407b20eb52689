"""A seeking reader of one WebDataset / parquet shard of a :class:`~hf_mmsel.data.shards.ShardManifest`.

:func:`iter_shard` yields rows ``dict(sample_idx, key, image, caption[, label, ...])`` from any position on,
seeking over earlier samples (tar headers / parquet row groups) without decoding them; a bad sample raises
:class:`~hf_mmsel.data.shard_format.BadSampleError` naming its shard and key, or is skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .shard_format import (
    CAPTION_EXTENSION,
    IMAGE_EXTENSIONS,
    BadSampleError,
    decode_image,
    hash_tar_member,
    parquet_columns,
    sample_key,
    tar_sample_groups,
)

if TYPE_CHECKING:
    from .shards import ShardEntry

BAD_SAMPLE_POLICIES = ("raise", "skip")


def check_bad_sample_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")



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
            row["image"] = decode_image(data[image_ext])
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
            groups = tar_sample_groups(entry.path, f)
            for key, members in groups:
                for info in members:
                    hash_tar_member(h, info)
                if position >= start:
                    row = _row_or_skip(lambda: _tar_row(entry, f, size, key, members, position, decode_images),
                                       on_bad_sample, stats)
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


def _tar_row(entry: ShardEntry, f, size: int, key: str, members, position: int, decode_images: bool) -> dict:
    """The row of one tar sample read from its members' byte ranges (a member past the end: truncated shard)."""
    data = {}
    for info in members:
        if info.offset_data + info.size > size:
            raise BadSampleError(
                f"{entry.path}: sample {key!r} is truncated (member {info.name} needs "
                f"{info.offset_data + info.size} bytes, the shard has {size})"
            )
        f.seek(info.offset_data)
        data[sample_key(info.name)[1]] = f.read(info.size)
    return _row_from_members(entry, key, data, entry.offset + position, decode_images)


def _row_or_skip(make_row, on_bad_sample: str, stats) -> dict | None:
    """``make_row()``, or None for a bad sample under ``on_bad_sample="skip"`` (counted in ``stats``)."""
    try:
        return make_row()
    except BadSampleError as e:
        if on_bad_sample == "raise":
            raise
        _count_bad(stats, e)
        return None


def _count_bad(stats, error: Exception) -> None:
    if stats is None:
        return
    stats["bad_samples"] = stats.get("bad_samples", 0) + 1
    examples = stats.setdefault("bad_sample_examples", [])
    if len(examples) < 20:
        examples.append(str(error))



def _iter_parquet(entry: ShardEntry, start: int, on_bad_sample: str, decode_images: bool, stats) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(entry.path)
    names = pf.schema_arrow.names
    image_col, caption_col, key_col = parquet_columns(entry, names)
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
                row = _row_or_skip(lambda: {**_parquet_row(entry, table, i, key, image_col, caption_col, extra,
                                                            decode_images), "sample_idx": entry.offset + position},
                                   on_bad_sample, stats)
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
            row["image"] = decode_image(data)
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
    check_bad_sample_policy(on_bad_sample)
    if not 0 <= start <= entry.count:
        raise ValueError(f"start must lie in [0, {entry.count}] for {entry.path}, got {start}")
    reader = _iter_tar if entry.format == "webdataset" else _iter_parquet
    return reader(entry, start, on_bad_sample, decode_images, stats)

