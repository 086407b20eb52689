"""Embedded offline image-text data: real easy-vqa images captioned from their question/answer pairs.

easy-vqa (PyPI ``easy-vqa``, MIT) ships 5,000 real 64x64 PNG images (4,000 train / 1,000 test), each showing one
coloured shape, and ~48k yes/no and open questions about them. A caption needs the image's colour and shape,
which :func:`derive_color_shape` reads off the QA pairs (docs/design.md, Data §1.3):

* open questions: "what color is the {shape}?" -> colour (and the shape from the question), "what is the
  {color} shape?" -> shape (and the colour from the question), "what shape ..." -> shape;
* yes/no questions: a positive fact ("is there a red shape?" -> yes, or a negated form such as
  "is there not a red shape?" -> no) gives the colour/shape named in the question; a negative fact excludes it,
  and a value is inferred when all but one of the choices are excluded (one shape per image).

Images whose colour or shape stays unknown (or whose facts contradict) are dropped. Labels:
``label = EASY_VQA_COLORS.index(color) * 3 + EASY_VQA_SHAPES.index(shape)`` (24 classes), so
``color = label // 3`` and ``shape = label % 3``; ``EASY_VQA_CLASS_CAPTIONS[label]`` is the zero-shot prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from datasets import DatasetDict

EASY_VQA_COLORS: list[str] = ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"]
EASY_VQA_SHAPES: list[str] = ["circle", "rectangle", "triangle"]
EASY_VQA_NUM_CLASSES: int = len(EASY_VQA_COLORS) * len(EASY_VQA_SHAPES)

#: Caption templates of ``templates="default"``; one is chosen per image, deterministically from ``seed``.
EASY_VQA_CAPTION_TEMPLATES: dict[str, list[str]] = {
    "default": [
        "a {color} {shape}",
        "a photo of a {color} {shape}",
        "a {shape} colored {color}",
        "a {color} {shape} on a plain background",
        "an image of a {color} {shape}",
        "there is a {color} {shape} in the picture",
    ],
    "simple": ["a {color} {shape}"],
}

#: ClassLabel names "{color} {shape}", index = label.
EASY_VQA_CLASS_NAMES: list[str] = [f"{color} {shape}" for color in EASY_VQA_COLORS for shape in EASY_VQA_SHAPES]

#: Zero-shot prompt of every class: ``EASY_VQA_CLASS_CAPTIONS[label]``.
EASY_VQA_CLASS_CAPTIONS: list[str] = [
    f"a photo of a {color} {shape}" for color in EASY_VQA_COLORS for shape in EASY_VQA_SHAPES
]

# Bump when the derivation or the stored layout changes: old caches are then ignored.
_CACHE_VERSION = "v1"

_COLOR_RE = "|".join(EASY_VQA_COLORS)
_SHAPE_RE = "|".join(EASY_VQA_SHAPES)
_NEGATED = re.compile(r"\b(not|no)\b")


def easy_vqa_label(color: str, shape: str) -> int:
    """Class index ``color_index * 3 + shape_index`` of a (colour, shape) pair."""
    return EASY_VQA_COLORS.index(color) * len(EASY_VQA_SHAPES) + EASY_VQA_SHAPES.index(shape)


def _facts(question: str, answer: str) -> list[tuple[str, str, bool]]:
    """(kind, value, holds) facts that one QA pair states about its image; kind is "color" or "shape"."""
    q = question.lower().strip().rstrip("?")
    answer = answer.lower().strip()
    if answer in ("yes", "no"):
        holds = (answer == "yes") != bool(_NEGATED.search(q))  # "is there not a X?" -> "no" means X is there
        facts = [("color", c, holds) for c in re.findall(rf"\b({_COLOR_RE})\b", q)]
        facts += [("shape", s, holds) for s in re.findall(rf"\b({_SHAPE_RE})\b", q)]
        if len(facts) > 1 and not holds:  # "no red circle" does not say which of the two is absent
            return []
        return facts
    facts = [("color", c, True) for c in re.findall(rf"\b({_COLOR_RE})\b", q)]
    facts += [("shape", s, True) for s in re.findall(rf"\b({_SHAPE_RE})\b", q)]
    if answer in EASY_VQA_COLORS:
        facts.append(("color", answer, True))
    elif answer in EASY_VQA_SHAPES:
        facts.append(("shape", answer, True))
    return facts


def derive_color_shape(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """Map image id -> (colour, shape) for every image whose QA pairs determine both consistently."""
    choices = {"color": EASY_VQA_COLORS, "shape": EASY_VQA_SHAPES}
    present: dict[int, dict[str, set[str]]] = {}
    absent: dict[int, dict[str, set[str]]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        for kind, value, holds in _facts(question, answer):
            target = present if holds else absent
            target.setdefault(image_id, {"color": set(), "shape": set()})[kind].add(value)
    result: dict[int, tuple[str, str]] = {}
    for image_id in set(present) | set(absent):
        values = {}
        for kind in ("color", "shape"):
            pos = present.get(image_id, {}).get(kind, set())
            neg = absent.get(image_id, {}).get(kind, set())
            if pos & neg or len(pos) > 1:  # contradictory facts
                break
            remaining = [v for v in choices[kind] if v not in neg]
            if len(pos) == 1:
                values[kind] = next(iter(pos))
            elif len(remaining) == 1:
                values[kind] = remaining[0]
            else:
                break
        else:
            result[image_id] = (values["color"], values["shape"])
    return result


def _resolve_templates(templates: str | Sequence[str]) -> list[str]:
    if isinstance(templates, str):
        if templates not in EASY_VQA_CAPTION_TEMPLATES:
            raise ValueError(
                f"unknown caption template set {templates!r}; choose one of "
                f"{sorted(EASY_VQA_CAPTION_TEMPLATES)} or pass a list of format strings"
            )
        return list(EASY_VQA_CAPTION_TEMPLATES[templates])
    resolved = list(templates)
    if not resolved:
        raise ValueError("templates must not be empty")
    for template in resolved:
        try:
            template.format(color="red", shape="circle")
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"caption template {template!r} may only use the fields {{color}} and {{shape}}"
            ) from err
    return resolved


def _build_split(split: str, templates: list[str], rng: np.random.Generator):
    import easy_vqa
    from datasets import ClassLabel, Dataset, Features, Image, Value

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    facts = derive_color_shape(questions, answers, image_ids)
    kept = sorted(i for i in facts if i in paths)
    choice = rng.integers(len(templates), size=len(kept))
    images, captions, labels = [], [], []
    for image_id, t in zip(kept, choice):
        color, shape = facts[image_id]
        images.append({"bytes": Path(paths[image_id]).read_bytes(), "path": f"{split}/{image_id}.png"})
        captions.append(templates[t].format(color=color, shape=shape))
        labels.append(easy_vqa_label(color, shape))
    features = Features(
        {
            "image": Image(),
            "caption": Value("string"),
            "label": ClassLabel(names=EASY_VQA_CLASS_NAMES),
            "sample_idx": Value("int64"),
        }
    )
    data = {"image": images, "caption": captions, "label": labels, "sample_idx": list(range(len(kept)))}
    return Dataset.from_dict(data, features=features, split=split)


def _cache_dir(templates: list[str], seed: int) -> Path:
    from datasets import config

    key = hashlib.sha1(json.dumps([_CACHE_VERSION, templates, seed]).encode()).hexdigest()[:16]
    return Path(config.HF_DATASETS_CACHE) / "hf_mmsel" / f"easy_vqa_captions_{_CACHE_VERSION}_{key}"


def load_easy_vqa_captions(
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    templates: str | Sequence[str] = "default",
    seed: int = 0,
    cache: bool = True,
) -> DatasetDict:
    """Real easy-vqa images with derived captions, as ``DatasetDict(train, test)``.

    Columns: ``image`` (PIL), ``caption`` (str), ``label`` (ClassLabel over the 24 (colour, shape) classes, see
    the module docstring), ``sample_idx`` (int64, 0..N-1 per split). About 3.5k train / 0.9k test pairs.

    Args:
        max_train, max_test: keep only the first n rows of a split (``sample_idx`` stays 0..n-1).
        templates: ``"default"`` (several phrasings), ``"simple"`` ("a {color} {shape}") or a list of format
            strings with ``{color}`` and ``{shape}``; one template is drawn per image with ``seed``.
        cache: store the built dataset under ``HF_DATASETS_CACHE/hf_mmsel`` so later calls only memory-map it.
    """
    from datasets import DatasetDict

    resolved = _resolve_templates(templates)
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of rows or None, got {value}")
    from .disk_cache import load_or_build

    def build() -> DatasetDict:
        rng = np.random.default_rng(seed)
        return DatasetDict({split: _build_split(split, resolved, rng) for split in ("train", "test")})

    dsd = load_or_build(_cache_dir(resolved, seed), build, cache=cache)
    for split, limit in (("train", max_train), ("test", max_test)):
        if limit is not None and limit < len(dsd[split]):
            dsd[split] = dsd[split].select(range(limit))
    return dsd
