"""Load any image-text dataset into the standard columns ``image`` / ``caption`` / ``sample_idx`` [/ ``label``].

Sources: the embedded benchmarks by name (``None`` or ``"easy-vqa"``: easy-vqa captions; ``"digits"``: MNIST-5k +
scikit-learn digits with templated captions, :mod:`hf_mmsel.data.digits`; ``"emoji"``: Noto Color Emoji renderings
with their CLDR names, :mod:`hf_mmsel.data.emoji`), a local ``save_to_disk`` folder, a local ``imagefolder``
(images + ``metadata.csv``/``metadata.jsonl``), or anything ``datasets.load_dataset`` accepts (Hub ids,
builder names, data files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, DatasetDict

    from .streaming import StreamingImageTextDataset

STANDARD_IMAGE_COLUMN = "image"
STANDARD_CAPTION_COLUMN = "caption"
STANDARD_LABEL_COLUMN = "label"
SAMPLE_IDX_COLUMN = "sample_idx"

#: Embedded offline image-text benchmarks, loadable by name (a local folder of the same name takes precedence).
EMBEDDED_IMAGE_TEXT_DATASETS: tuple[str, ...] = ("easy-vqa", "digits", "emoji")


def _load_embedded(name: str, load_kwargs: dict[str, Any]) -> DatasetDict:
    if name == "easy-vqa":
        from .easy_vqa import load_easy_vqa_captions

        return load_easy_vqa_captions(**load_kwargs)
    if name == "emoji":
        from .emoji import load_emoji_captions

        return load_emoji_captions(**load_kwargs)
    from .digits import load_digits_captions

    return load_digits_captions(**load_kwargs)


def is_save_to_disk_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def _load_raw(path_or_id: str, data_dir: str | None, load_kwargs: dict[str, Any]) -> DatasetDict:
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(path_or_id)
    if path.is_dir() and is_save_to_disk_folder(path):
        loaded = load_from_disk(str(path))
    elif path.is_dir() and not (path / "README.md").is_file() and _holds_images(
        path if data_dir is None else path / data_dir
    ):
        # a local folder of images (+ metadata.csv/jsonl) without a dataset card: the imagefolder builder
        folder = path if data_dir is None else path / data_dir
        loaded = load_dataset("imagefolder", data_dir=str(folder), **load_kwargs)
    else:  # Hub id, a dataset repo cloned locally, a builder name with data_files=...
        loaded = load_dataset(path_or_id, data_dir=data_dir, **load_kwargs)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({str(loaded.split or "train"): loaded})
    if not isinstance(loaded, DatasetDict):
        raise TypeError(
            f"{path_or_id!r} loaded as {type(loaded).__name__}; expected a Dataset or DatasetDict "
            "(streaming datasets are not supported here)"
        )
    return loaded


def _standardize_split(
    ds: Dataset, name: str, image_column: str, caption_column: str, label_column: str | None
) -> Dataset:
    from datasets import ClassLabel, Image, Sequence, Value

    if len(ds) == 0:
        raise ValueError(f"split {name!r} is empty: an image-text dataset needs at least one row")
    wanted = {"image_column": image_column, "caption_column": caption_column}
    if label_column is not None:
        wanted["label_column"] = label_column
    for arg, column in wanted.items():
        if column not in ds.column_names:
            from hf_mmsel.errors import UsageError

            raise UsageError(
                f"column {column!r} ({arg}) not found in split {name!r}; existing columns: {ds.column_names} "
                f"(pass --{arg} <one of them>)"
            )
    renames = {image_column: STANDARD_IMAGE_COLUMN, caption_column: STANDARD_CAPTION_COLUMN}
    if label_column is not None:
        renames[label_column] = STANDARD_LABEL_COLUMN
    renames = {src: dst for src, dst in renames.items() if src != dst}
    # a column already holding a standard name that another column replaces keeps its data as original_<name>
    clashes = {dst: f"original_{dst}" for src, dst in renames.items() if dst in ds.column_names and dst not in renames}
    if clashes:
        ds = ds.rename_columns(clashes)
    if renames:
        ds = ds.rename_columns(renames)

    image_feature = ds.features[STANDARD_IMAGE_COLUMN]
    if not isinstance(image_feature, Image):
        if isinstance(image_feature, Value) and image_feature.dtype in ("string", "large_string", "binary",
                                                                         "large_binary"):
            ds = ds.cast_column(STANDARD_IMAGE_COLUMN, Image())
        elif isinstance(image_feature, dict) and {"bytes", "path"} >= set(image_feature):
            ds = ds.cast_column(STANDARD_IMAGE_COLUMN, Image())
        else:
            raise ValueError(
                f"image column {image_column!r} has feature {image_feature}; expected datasets.Image, "
                "file paths (string) or encoded bytes"
            )
    caption_feature = ds.features[STANDARD_CAPTION_COLUMN]
    if not (isinstance(caption_feature, Value) and caption_feature.dtype in ("string", "large_string")):
        hint = ""
        if isinstance(caption_feature, (Sequence, list)):
            hint = " (several captions per image: explode them into one row per caption first)"
        raise ValueError(
            f"caption column {caption_column!r} must hold strings, found {caption_feature}{hint}"
        )
    if label_column is not None:
        label_feature = ds.features[STANDARD_LABEL_COLUMN]
        if isinstance(label_feature, Value) and label_feature.dtype in ("string", "large_string"):
            ds = ds.class_encode_column(STANDARD_LABEL_COLUMN)
        elif not isinstance(label_feature, ClassLabel) and not (
            isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint"))
        ):
            raise ValueError(
                f"label column {label_column!r} must hold integer or string class labels, found {label_feature}"
            )
    return add_sample_idx(ds)


def add_sample_idx(ds: Dataset) -> Dataset:
    """(Re)write ``sample_idx`` as the stable row index 0..N-1 (int64) of this split."""
    if SAMPLE_IDX_COLUMN in ds.column_names:
        ds = ds.remove_columns(SAMPLE_IDX_COLUMN)
    return ds.add_column(SAMPLE_IDX_COLUMN, np.arange(len(ds), dtype=np.int64))


def load_image_text_dataset(
    path_or_id: str | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    manifest_path: str | None = None,
    on_bad_sample: str = "raise",
    **load_kwargs: Any,
) -> DatasetDict | Dataset | StreamingImageTextDataset:
    """Load image-text pairs with the standard columns ``image``, ``caption``, ``sample_idx`` [, ``label``].

    Args:
        path_or_id: ``None`` or ``"easy-vqa"`` for the embedded easy-vqa captions (:func:`load_easy_vqa_captions`,
            with its ``label``); ``"digits"`` for the embedded digits benchmark (:func:`load_digits_captions`:
            train/validation/test, with ``label``); ``"emoji"`` for the embedded emoji benchmark
            (:func:`load_emoji_captions`: emoji rendered from the Debian font ``fonts-noto-color-emoji`` with their
            CLDR names as captions, train/validation/test split by emoji group, ``label`` = group); a local
            ``save_to_disk`` folder (Dataset or DatasetDict); a
            local folder of images with ``metadata.csv``/``metadata.jsonl`` (``imagefolder``: the image column is then ``image`` and the
            caption column is whatever metadata names it); otherwise a Hub id or builder passed to
            ``datasets.load_dataset`` together with ``data_dir`` and ``load_kwargs``.
        image_column, caption_column, label_column: source columns, renamed to ``image``/``caption``/``label``.
            Image paths or bytes are cast to ``datasets.Image``; string labels are class-encoded.
        split: return only this split as a ``Dataset``.
        max_samples: keep the first n rows of every split.
        streaming: read WebDataset ``.tar`` / parquet shards lazily instead (a local folder, a glob, or a Hub
            dataset id whose shards are fetched with ``huggingface_hub``; ``data_dir`` selects a subfolder) and
            return an un-configured :class:`~hf_mmsel.data.streaming.StreamingImageTextDataset`; its
            ``sample_idx`` comes from the shard manifest (``manifest_path``, default ``manifest.json`` next to
            the shards, built once and reused). ``on_bad_sample``: ``"raise"`` or ``"skip"``.

    Returns a ``DatasetDict`` (or a ``Dataset`` when ``split`` is given) whose ``sample_idx`` is 0..N-1 per
    split. Raises ``ValueError`` for a missing column (listing the existing ones), an unknown or empty split.
    """
    from datasets import DatasetDict

    if streaming:
        if path_or_id is None:
            raise ValueError(
                "streaming=True reads shards: write the embedded data with "
                "hf_mmsel.data.write_webdataset_shards(load_easy_vqa_captions()['train'], DIR) and pass DIR"
            )
        unsupported = {"split": split, "max_samples": max_samples, "label_column": label_column}
        unsupported = [k for k, v in unsupported.items() if v is not None]
        if unsupported or load_kwargs or (image_column, caption_column) != ("image", "caption"):
            raise ValueError(
                f"streaming=True reads the WebDataset/parquet column conventions of hf_mmsel.data.shards; "
                f"unsupported arguments: {unsupported + sorted(load_kwargs)}"
            )
        return load_streaming_image_text_dataset(
            str(path_or_id), data_dir=data_dir, manifest_path=manifest_path, on_bad_sample=on_bad_sample
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive number of rows or None, got {max_samples}")
    embedded = "easy-vqa" if path_or_id is None else str(path_or_id)
    if embedded in EMBEDDED_IMAGE_TEXT_DATASETS and not Path(embedded).exists():
        raw = _load_embedded(embedded, load_kwargs)
        if label_column is None:
            label_column = STANDARD_LABEL_COLUMN
    else:
        raw = _load_raw(str(path_or_id), data_dir, load_kwargs)
    if split is not None and split not in raw:
        raise ValueError(f"split {split!r} not found in {path_or_id or 'easy-vqa'}; available splits: {list(raw)}")
    names = [split] if split is not None else list(raw)
    out = DatasetDict()
    for name in names:
        ds = raw[name]
        if max_samples is not None and max_samples < len(ds):
            ds = ds.select(range(max_samples))
        out[name] = _standardize_split(ds, name, image_column, caption_column, label_column)
    return out[split] if split is not None else out


def resolve_shard_source(source: str, data_dir: str | None = None) -> str:
    """A local folder / file / glob of shards as is; otherwise a Hub dataset id whose ``*.tar`` / ``*.parquet``
    files (and ``manifest.json``) are fetched with ``huggingface_hub.snapshot_download``."""
    import glob

    local = Path(source) if data_dir is None else Path(source) / data_dir
    if local.exists() or glob.glob(str(local)):
        return str(local)
    from huggingface_hub import snapshot_download

    prefix = f"{data_dir.strip('/')}/" if data_dir else ""
    patterns = [f"{prefix}**.tar", f"{prefix}**.parquet", f"{prefix}*.tar", f"{prefix}*.parquet",
                f"{prefix}manifest.json"]
    folder = snapshot_download(repo_id=source, repo_type="dataset", allow_patterns=patterns)
    return str(Path(folder) / data_dir) if data_dir else folder


def load_streaming_image_text_dataset(
    source: str,
    *,
    data_dir: str | None = None,
    manifest_path: str | None = None,
    on_bad_sample: str = "raise",
) -> StreamingImageTextDataset:
    """Shards (folder, glob or Hub id) -> manifest (reused or built) -> un-configured streaming dataset."""
    from .shards import ShardManifest
    from .streaming import StreamingImageTextDataset

    manifest = ShardManifest.load_or_build(resolve_shard_source(source, data_dir), manifest_path)
    return StreamingImageTextDataset(manifest, on_bad_sample=on_bad_sample)
