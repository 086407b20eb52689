"""Multi-task data for MoLA: MultiTaskSpec, combine_tasks, the embedded benchmark and its collator."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from hf_mmsel.data.multitask import (
    MultiTaskCollator,
    MultiTaskSpec,
    combine_tasks,
    images_to_pixel_values,
    load_multitask_benchmark,
)


def test_spec_round_trip_and_validation():
    spec = MultiTaskSpec(["a", "b"], [3, 5])
    assert MultiTaskSpec.from_dict(spec.to_dict()) == spec
    assert spec.num_tasks == 2 and spec.max_num_labels == 5 and spec.task_id("b") == 1
    with pytest.raises(KeyError, match="unknown task 'c'"):
        spec.task_id("c")
    with pytest.raises(ValueError, match="2 task_names but 1 num_labels"):
        MultiTaskSpec(["a", "b"], [3])
    with pytest.raises(ValueError, match="duplicate"):
        MultiTaskSpec(["a", "a"], [3, 3])


def test_images_to_pixel_values_scales_resizes_and_expands_channels():
    white_gray = np.full((8, 8), 255, dtype=np.uint8)
    red_pil = PILImage.new("RGB", (40, 20), (255, 0, 0))
    out = images_to_pixel_values([white_gray, red_pil], image_size=16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(out[1, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1, 1:], -1.0, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        images_to_pixel_values([np.zeros((2, 2, 2, 2), dtype=np.uint8)])


def _toy_tasks():
    rng = np.random.default_rng(0)
    shapes_ds = Dataset.from_dict(
        {"img": [PILImage.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)) for _ in range(5)],
         "y": [0, 1, 2, 1, 0]},
        features=Features({"img": Image(), "y": ClassLabel(num_classes=4)}),
    )
    digits_ds = Dataset.from_dict({"img": [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(3)],
                                   "y": [7, 2, 9]})
    return {"shapes": shapes_ds, "digits": digits_ds}


def test_combine_tasks_columns_task_ids_and_label_spaces():
    ds, spec = combine_tasks(_toy_tasks(), image_column="img", label_column="y", image_size=12)
    assert spec.task_names == ["shapes", "digits"]
    assert spec.num_labels == [4, 10]  # ClassLabel.num_classes, then max + 1
    assert len(ds) == 8 and set(ds.column_names) == {"pixel_values", "label", "task_id"}
    row = ds[6]
    assert row["pixel_values"].shape == (3, 12, 12) and row["pixel_values"].dtype == torch.float32
    assert ds["task_id"][:].tolist() == [0] * 5 + [1] * 3
    assert ds["label"][:].tolist() == [0, 1, 2, 1, 0, 7, 2, 9]
    # grey digits are repeated to 3 identical channels
    assert torch.equal(row["pixel_values"][0], row["pixel_values"][2])


def test_combine_tasks_errors_name_the_problem():
    tasks = _toy_tasks()
    with pytest.raises(ValueError, match="column 'image' not found; available columns: \\['img', 'y'\\]"):
        combine_tasks(tasks, label_column="y")
    with pytest.raises(ValueError, match="task 'digits': labels must lie in \\[0, 5\\)"):
        combine_tasks(tasks, image_column="img", label_column="y", num_labels={"digits": 5})
    with pytest.raises(ValueError, match="at least one task"):
        combine_tasks({})


def test_collator_renames_to_model_inputs():
    ds, _ = combine_tasks(_toy_tasks(), image_column="img", label_column="y", image_size=8)
    batch = MultiTaskCollator()([ds[0], ds[5]])
    assert set(batch) == {"pixel_values", "labels", "task_ids"}
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["labels"].tolist() == [0, 7] and batch["task_ids"].tolist() == [0, 1]
    with pytest.raises(KeyError, match="task_id"):
        MultiTaskCollator()([{"pixel_values": torch.zeros(3, 2, 2), "label": 1}])


@pytest.fixture(scope="module")
def small_benchmark():
    return load_multitask_benchmark(max_per_task=150, image_size=16)


def test_benchmark_tasks_labels_and_format(small_benchmark):
    data, spec = small_benchmark
    assert spec.task_names == ["digits_sklearn", "digits_mnist", "easy_vqa_color", "easy_vqa_shape"]
    assert spec.num_labels == [10, 10, 8, 3]
    for split, per_task in (("train", 120), ("test", 30)):
        ds = data[split].with_format("numpy")
        task_ids, labels = ds["task_id"][:], ds["label"][:]
        assert np.bincount(task_ids, minlength=4).tolist() == [per_task] * 4
        for t, n in enumerate(spec.num_labels):
            assert labels[task_ids == t].max() < n and labels[task_ids == t].min() >= 0
    x = data["train"][0]["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_benchmark_labels_match_images(small_benchmark):
    """A nearest-class-mean classifier on raw pixels is far above chance on the digit tasks: labels belong to their
    images (easy-vqa colour/shape on pastel backgrounds are too weak for this check; their labels come from
    ``derive_color_shape``, tested with the image-text data)."""
    data, spec = small_benchmark
    train, test = data["train"].with_format("numpy"), data["test"].with_format("numpy")
    xtr, ytr, ttr = train["pixel_values"][:].reshape(len(train), -1), train["label"][:], train["task_id"][:]
    xte, yte, tte = test["pixel_values"][:].reshape(len(test), -1), test["label"][:], test["task_id"][:]
    for t, n in enumerate(spec.num_labels[:2]):
        classes = [c for c in range(n) if (ytr[ttr == t] == c).any()]
        means = np.stack([xtr[(ttr == t) & (ytr == c)].mean(0) for c in classes])
        dists = ((xte[tte == t][:, None, :] - means[None]) ** 2).sum(-1)
        acc = float((np.asarray(classes)[dists.argmin(1)] == yte[tte == t]).mean())
        assert acc > 0.5, (spec.task_names[t], acc)


def test_benchmark_is_deterministic_and_cached(small_benchmark):
    data, _ = small_benchmark
    fresh, _ = load_multitask_benchmark(max_per_task=150, image_size=16, cache=False)
    assert torch.equal(fresh["test"]["pixel_values"][:], data["test"]["pixel_values"][:])
    assert torch.equal(fresh["train"]["label"][:], data["train"]["label"][:])
    start = time.perf_counter()
    cached, _ = load_multitask_benchmark(max_per_task=150, image_size=16)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(cached["train"]["pixel_values"][:], data["train"]["pixel_values"][:])
    other_seed, _ = load_multitask_benchmark(max_per_task=150, image_size=16, seed=1, cache=False)
    assert not torch.equal(other_seed["train"]["label"][:], data["train"]["label"][:])
    with pytest.raises(ValueError, match="test_fraction"):
        load_multitask_benchmark(test_fraction=1.0)


def test_split_by_task_holds_out_a_fraction_of_every_task():
    from datasets import Dataset

    from hf_mmsel.data.multitask import split_by_task

    task_id = np.repeat([0, 1, 2], [40, 10, 3])
    ds = Dataset.from_dict({"task_id": task_id, "uid": np.arange(len(task_id))})
    rest, held = split_by_task(ds, 0.25, seed=0)
    assert np.bincount(np.asarray(held["task_id"])).tolist() == [10, 2, 1]  # round(0.25 n), >= 1 per task
    rest_uid, held_uid = list(rest["uid"]), list(held["uid"])
    assert sorted(rest_uid + held_uid) == list(range(len(task_id)))  # a partition
    assert held_uid == sorted(held_uid)  # original order kept
    again, _ = split_by_task(ds, 0.25, seed=0)
    other, _ = split_by_task(ds, 0.25, seed=1)
    assert list(again["uid"]) == rest_uid and list(other["uid"]) != rest_uid
    with pytest.raises(ValueError, match="fraction"):
        split_by_task(ds, 1.0)
    with pytest.raises(ValueError, match="need >= 2"):
        split_by_task(Dataset.from_dict({"task_id": [0, 0, 1]}), 0.5)
