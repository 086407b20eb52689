"""Noisy-correspondence injection (NCR protocol): shuffle the captions of a random subset of pairs.

A fraction ``ratio`` of the rows is drawn at random (deterministic per ``seed``) and their captions are permuted
among themselves. A pair only becomes *noisy* when its new caption no longer describes its image: with a label
column, when the caption's source label differs from the image's label; without one, when the caption text
differs (two rows with the same caption text still match). The permutation is repaired by random swaps so that,
wherever the subset allows it, every shuffled pair is noisy, i.e. on clean input
``is_noisy.mean() == round(ratio * N) / N`` (plain NCR shuffling would leave ~1/K of the shuffled pairs matching
with K balanced classes, e.g. ~4 % for easy-vqa's 24). The repair is impossible only when one label (or caption
text) holds more than half of the subset; the surplus rows then stay clean and the realised rate is lower
(read it from ``is_noisy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, DatasetDict

IS_NOISY_COLUMN = "is_noisy"
SOURCE_IDX_COLUMN = "source_idx"
# cached text-side columns that must travel with the caption
_TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def derange_by_key(
    image_keys: np.ndarray, caption_keys: np.ndarray, rng: np.random.Generator, max_rounds: int = 50
) -> np.ndarray:
    """A random permutation ``perm`` with ``caption_keys[perm[i]] != image_keys[i]`` wherever possible.

    Row i then carries the caption of row ``perm[i]``. Starts from a uniform random permutation and repairs every
    still-matching position i by swapping targets with a random partner j for which both new pairs mismatch.
    """
    n = len(image_keys)
    perm = rng.permutation(n)
    for _ in range(max_rounds):
        bad = np.flatnonzero(caption_keys[perm] == image_keys)
        if bad.size == 0:
            break
        rng.shuffle(bad)
        for i in bad:
            if caption_keys[perm[i]] != image_keys[i]:  # already fixed by an earlier swap
                continue
            j = _swap_partner(i, perm, image_keys, caption_keys, rng)
            if j is not None:
                perm[i], perm[j] = perm[j], perm[i]
    return perm


def _swap_partner(
    i: int, perm: np.ndarray, image_keys: np.ndarray, caption_keys: np.ndarray, rng: np.random.Generator
) -> int | None:
    """A random j such that swapping the targets of i and j leaves both pairs mismatched (None if none exists).
    Tries a few random draws first (O(1) when no key dominates), then scans all positions."""
    for j in rng.integers(len(perm), size=32):
        if caption_keys[perm[j]] != image_keys[i] and image_keys[j] != caption_keys[perm[i]]:
            return int(j)
    ok = np.flatnonzero((caption_keys[perm] != image_keys[i]) & (image_keys != caption_keys[perm[i]]))
    return int(ok[rng.integers(ok.size)]) if ok.size else None


def _column(ds: Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read in a single Arrow batch (indices mappings respected)."""
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name])


def _codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Shared integer codes of hashable keys (labels or caption strings) for fast comparisons."""
    values = [np.asarray(a).astype(str) if np.asarray(a).dtype == object else np.asarray(a) for a in arrays]
    _, codes = np.unique(np.concatenate(values), return_inverse=True)
    return np.split(codes, np.cumsum([len(v) for v in values])[:-1])


def _realise(ds: Dataset, ratio: float, seed: int, caption_column: str, label_column: str | None) -> Dataset:
    from datasets import Value, concatenate_datasets

    n = len(ds)
    if caption_column not in ds.column_names:
        raise ValueError(f"caption column {caption_column!r} not found; existing columns: {ds.column_names}")
    # source_idx of an already noisy dataset: row i carries the original caption of row previous[i]
    previous = (
        _column(ds, SOURCE_IDX_COLUMN).astype(np.int64)
        if SOURCE_IDX_COLUMN in ds.column_names
        else np.arange(n, dtype=np.int64)
    )
    if label_column is not None and label_column in ds.column_names:
        labels = _column(ds, label_column)
        image_keys, caption_keys = labels, labels[previous]  # a caption's key: label of the image it describes
    else:
        captions = _column(ds, caption_column).astype(object)
        original = np.empty(n, dtype=object)
        original[previous] = captions
        image_keys, caption_keys = original, captions  # a pair matches iff the text equals its original caption
    image_keys, caption_keys = _codes(image_keys, caption_keys)

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=int(round(ratio * n)), replace=False))
    perm = np.arange(n)
    if chosen.size:
        perm[chosen] = chosen[derange_by_key(image_keys[chosen], caption_keys[chosen], rng)]
    source = previous[perm]
    is_noisy = caption_keys[perm] != image_keys

    text_columns = [caption_column, *(c for c in _TOKEN_COLUMNS if c in ds.column_names)]
    drop = [c for c in (IS_NOISY_COLUMN, SOURCE_IDX_COLUMN) if c in ds.column_names]
    order = [c for c in ds.column_names if c not in drop] + [SOURCE_IDX_COLUMN, IS_NOISY_COLUMN]
    rest = ds.remove_columns(text_columns + drop)
    text = ds.select_columns(text_columns).select(perm)
    out = concatenate_datasets([rest, text], axis=1)
    out = out.add_column(SOURCE_IDX_COLUMN, source.astype(np.int64), feature=Value("int64"))
    out = out.add_column(IS_NOISY_COLUMN, is_noisy.astype(bool), feature=Value("bool"))
    return out.select_columns(order)


def inject_noisy_correspondence(
    ds: Dataset | DatasetDict,
    ratio: float,
    seed: int = 0,
    *,
    caption_column: str = "caption",
    label_column: str | None = "label",
    splits: Sequence[str] = ("train",),
) -> Dataset | DatasetDict:
    """Shuffle the captions of ``round(ratio * N)`` random rows among themselves (NCR-style noise).

    Adds ``source_idx`` (the row whose original caption this row now carries; its own index for untouched rows)
    and ``is_noisy`` (ground truth for evaluation only: the pair no longer matches, judged by ``label_column``
    when that column exists, else by caption text). Cached ``input_ids``/``attention_mask`` columns move with
    the caption; all other columns are kept. Applying it to an already noisy dataset composes the shuffles.

    ``ds`` is a ``Dataset`` or a ``DatasetDict``; for the latter only ``splits`` (default: train) get noise and
    the other splits are returned unchanged (evaluation stays clean). ``ratio`` must lie in [0, 1).
    """
    from datasets import DatasetDict

    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"noise ratio must lie in [0, 1), got {ratio!r}")
    if isinstance(ds, DatasetDict):
        missing = [s for s in splits if s not in ds]
        if missing:
            raise ValueError(f"splits {missing} not found; available splits: {list(ds)}")
        return DatasetDict(
            {
                name: _realise(split, float(ratio), seed, caption_column, label_column) if name in splits else split
                for name, split in ds.items()
            }
        )
    return _realise(ds, float(ratio), seed, caption_column, label_column)
