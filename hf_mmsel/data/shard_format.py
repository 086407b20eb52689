"""The on-disk layout of WebDataset ``.tar`` and parquet shards: sample keys, tar member groups, column names.

WebDataset convention (as ``datasets``' webdataset builder): members of one sample are consecutive and share the
key = file name up to its first dot; ``.jpg|.jpeg|.png|.webp`` is the image, ``.txt`` the caption, an optional
``.json`` may carry ``label`` (and other scalar fields such as ``is_noisy``), ``.cls`` an integer label.
Parquet: image column ``image`` (``{"bytes", "path"}`` struct or binary) or ``jpg``/``png``/..., caption
``caption`` or ``txt``, optional ``label``, key ``__key__`` or ``key``. Keys are never parsed.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .shards import ShardEntry

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
SHARD_SUFFIXES = (".tar", ".parquet")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
PARQUET_CAPTION_COLUMNS = ("caption", "txt")
PARQUET_KEY_COLUMNS = ("__key__", "key")


class BadSampleError(ValueError):
    """A sample that cannot be read: the message names the shard path and the key."""


def shard_format(path: str) -> str:
    if path.endswith(".tar"):
        return "webdataset"
    if path.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: not a shard (expected a .tar WebDataset shard or a .parquet file)")


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: ``dir/000012.seg.png`` -> (``dir/000012``, ``seg.png``)."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def tar_sample_groups(path: str, fileobj) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
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
            member_key, _ = sample_key(info.name)
            if member_key != key and members:
                yield key, members
                members = []
            key = member_key
            members.append(info)
        if members:
            yield key, members



def hash_tar_member(h, info: tarfile.TarInfo) -> None:
    h.update(f"{info.name}\0{info.size}\n".encode())



def parquet_key_column(names: list[str]) -> str | None:
    return next((c for c in PARQUET_KEY_COLUMNS if c in names), None)



def decode_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # force the decode now so a broken file fails here, with its shard and key
    return image



def parquet_columns(entry: ShardEntry, names: list[str]) -> tuple[str, str, str | None]:
    image = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    caption = next((c for c in PARQUET_CAPTION_COLUMNS if c in names), None)
    if image is None or caption is None:
        raise ValueError(
            f"{entry.path}: parquet shards need an image column ({'|'.join(PARQUET_IMAGE_COLUMNS)}) and a caption "
            f"column ({'|'.join(PARQUET_CAPTION_COLUMNS)}); columns: {names}"
        )
    return image, caption, parquet_key_column(names)



def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same rows always give byte-identical shards
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))

