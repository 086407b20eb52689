"""The second embedded image-text benchmark: MNIST-5k + scikit-learn digits with templated captions."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mmsel.data import DIGIT_WORDS, load_digits_captions, load_image_text_dataset


@pytest.fixture(scope="module")
def digits():
    return load_image_text_dataset("digits")


def test_digits_splits_are_disjoint_and_sized(digits):
    assert set(digits) == {"train", "validation", "test"}
    assert (len(digits["train"]), len(digits["validation"]), len(digits["test"])) == (4997, 800, 1000)
    from datasets import Image

    paths = {split: {im["path"] for im in digits[split].cast_column("image", Image(decode=False))["image"]}
             for split in digits}
    assert not paths["train"] & paths["test"] and not paths["train"] & paths["validation"]
    assert not paths["validation"] & paths["test"]
    for split in digits:
        assert digits[split]["sample_idx"] == list(range(len(digits[split])))


def test_digits_captions_name_their_label(digits):
    train = digits["train"]
    for caption, label in zip(train["caption"][:500], train["label"][:500]):
        assert str(label) in caption.split() or DIGIT_WORDS[label] in caption.split()
    assert set(train["domain"]) == {"mnist_5k", "sklearn_digits"}
    counts = np.bincount(train["label"], minlength=10)
    assert counts.min() > 300  # every class present in quantity
    image = train[0]["image"]
    assert image.size == (28, 28) and image.mode == "RGB"


def test_digits_is_deterministic_and_templates_are_checked():
    a = load_digits_captions(seed=0)
    b = load_digits_captions(seed=0, cache=False)
    assert a["test"]["caption"] == b["test"]["caption"]
    with pytest.raises(ValueError, match="may only use the fields"):
        load_digits_captions(templates=["a {colour} digit"])


def test_a_local_folder_named_like_an_embedded_dataset_wins(tmp_path, monkeypatch):
    from datasets import Dataset
    from PIL import Image

    Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "caption": ["x"]}).save_to_disk(str(tmp_path / "digits"))
    monkeypatch.chdir(tmp_path)
    loaded = load_image_text_dataset("digits")
    assert len(loaded["train"]) == 1
