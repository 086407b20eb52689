"""Writing WebDataset shards: a map-style dataset as shards, or the kept samples of existing shards.

Members get fixed metadata (``mtime`` 0, mode 644, no owner), so the same rows always give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from .shard_format import IMAGE_EXTENSIONS, add_tar_member, tar_sample_groups
from .shards import MANIFEST_FILENAME, ShardManifest


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
                add_tar_member(tar, f"{key}.{ext}", data)
                add_tar_member(tar, f"{key}.txt", str(rows[caption_column][i]).encode("utf-8"))
                meta = {c: _plain(rows[c][i]) for c in extras}
                if label_column is not None:
                    meta["label"] = int(rows[label_column][i])
                if meta:
                    add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        os.replace(tmp, path)
        paths.append(str(path))
    manifest = ShardManifest.build(paths)
    manifest.save(out / MANIFEST_FILENAME)
    manifest.root = str(out.resolve())
    return manifest


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_kept_samples(manifest: ShardManifest, keep_idx: np.ndarray, output_dir: str | os.PathLike) -> list[str]:
    """The samples ``keep_idx`` (``sample_idx`` of ``manifest``) of every shard, in the shard's own format, as
    ``output_dir/<shard>.tar|.parquet`` plus a ``manifest.json``: tar members are copied byte for byte, parquet rows
    taken as stored. Shards with no kept sample are not written. Returns the written paths."""
    import pyarrow.parquet as pq

    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    keep_idx = np.asarray(keep_idx, dtype=np.int64)
    written = []
    shard_of = manifest.shard_of(keep_idx)
    for shard in np.unique(shard_of):
        entry = manifest.shards[int(shard)]
        positions = set((keep_idx[shard_of == shard] - entry.offset).tolist())
        if entry.format == "webdataset":
            path = target / f"{entry.name}.tar"
            with open(entry.path, "rb") as f, tarfile.open(path.with_suffix(".tmp"), "w",
                                                           format=tarfile.USTAR_FORMAT) as tar:
                for position, (key, members) in enumerate(tar_sample_groups(entry.path, f)):
                    if position in positions:
                        for info in members:
                            f.seek(info.offset_data)
                            add_tar_member(tar, info.name, f.read(info.size))
        else:
            path = target / f"{entry.name}.parquet"
            table = pq.read_table(entry.path)
            pq.write_table(table.take(sorted(positions)), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        written.append(str(path))
    if written:
        ShardManifest.build(written).save(target / MANIFEST_FILENAME)
    return written
