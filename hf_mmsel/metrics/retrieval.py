"""Image <-> text retrieval Recall@K (percent) and zero-shot classification accuracy (plain numpy).

Two levels of relevance of text j to image i:

* **pair level** (instance level, what the noisy-correspondence literature reports on Flickr30K / MS-COCO): text j
  is one of image i's own captions, ``owner(j) == i`` with ``owner = text_to_image`` (several captions per image)
  or the pair index (square matrix). With ``caption_ids``, captions with the same id are the same caption: text j
  is relevant when its id is the id of any caption of image i (templated data repeat caption strings; a model
  cannot be asked to tell two identical strings apart).
* **class level** (``image_labels`` / ``text_labels``): any caption of the same class is a hit. Reported under
  ``class_*`` keys by the model-level helpers; it is much easier than pair level and not comparable with it.

A query counts as a hit at K when its best-scored relevant item has rank < K, where rank = number of
*irrelevant* items scoring >= it: ties with irrelevant items count against the query (a collapsed model
with constant similarities scores ~0, not 100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_numpy(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def relevance_matrix(
    n_images: int, n_texts: int, image_labels=None, text_labels=None, text_to_image=None, caption_ids=None
) -> np.ndarray:
    """Boolean ``[n_images, n_texts]`` relevance: class level when labels are given, else pair level (module
    docstring), with ``caption_ids`` (one id per text) merging identical captions."""
    if (image_labels is None) != (text_labels is None):
        raise ValueError("give both image_labels and text_labels (relevance by label) or neither")
    if image_labels is not None:
        image_labels, text_labels = to_numpy(image_labels), to_numpy(text_labels)
        if image_labels.shape != (n_images,) or text_labels.shape != (n_texts,):
            raise ValueError(
                f"label shapes {image_labels.shape} / {text_labels.shape} do not match the similarity matrix "
                f"[{n_images}, {n_texts}]"
            )
        if caption_ids is not None:
            raise ValueError("caption_ids apply to pair-level relevance; give labels (class level) or caption_ids")
        return image_labels[:, None] == text_labels[None, :]
    if text_to_image is not None:
        owner = to_numpy(text_to_image, np.int64)
        if owner.shape != (n_texts,):
            raise ValueError(f"text_to_image has shape {owner.shape}, expected ({n_texts},)")
        if owner.size and (owner.min() < 0 or owner.max() >= n_images):
            raise ValueError(f"text_to_image values must lie in [0, {n_images}), got {owner.min()}..{owner.max()}")
    elif n_images != n_texts:
        raise ValueError(
            f"similarity is [{n_images}, {n_texts}]: without labels or text_to_image, relevance is by pair "
            "index and needs a square matrix"
        )
    else:
        owner = np.arange(n_texts)
    if caption_ids is None:
        return np.arange(n_images)[:, None] == owner[None, :]
    caption_ids = to_numpy(caption_ids)
    if caption_ids.shape != (n_texts,):
        raise ValueError(f"caption_ids has shape {caption_ids.shape}, expected ({n_texts},)")
    _, caption = np.unique(caption_ids, return_inverse=True)
    has_caption = np.zeros((n_images, int(caption.max()) + 1 if caption.size else 0), dtype=bool)
    has_caption[owner, caption] = True  # image i -> the distinct captions among its own
    return has_caption[:, caption]


def _hit_ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query (row): number of irrelevant items scoring >= the best relevant item; -1 if none relevant."""
    best = np.where(relevant, similarity, -np.inf).max(axis=1)
    ranks = ((similarity >= best[:, None]) & ~relevant).sum(axis=1)
    return np.where(relevant.any(axis=1), ranks, -1)


def retrieval_scores(
    similarity,
    image_labels=None,
    text_labels=None,
    ks: Sequence[int] = (1, 5, 10),
    text_to_image=None,
    caption_ids=None,
) -> dict[str, float]:
    """i2t_r{k} / t2i_r{k} (percent) and ``rsum`` from ``similarity[n_images, n_texts]``, at the level the
    arguments give (:func:`relevance_matrix`: class level with labels, else pair level).

    Queries without any relevant item are left out of the average for their direction.
    """
    sim = to_numpy(similarity, np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"similarity must be a non-empty 2-D [n_images, n_texts] matrix, got shape {sim.shape}")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    rel = relevance_matrix(*sim.shape, image_labels=image_labels, text_labels=text_labels, text_to_image=text_to_image,
                           caption_ids=caption_ids)
    results: dict[str, float] = {}
    for direction, s, r in (("i2t", sim, rel), ("t2i", sim.T, rel.T)):
        ranks = _hit_ranks(s, r)
        ranks = ranks[ranks >= 0]
        if ranks.size == 0:
            raise ValueError(f"no {direction} query has a relevant item; check labels / text_to_image")
        for k in ks:
            results[f"{direction}_r{int(k)}"] = float(100.0 * np.mean(ranks < int(k)))
    results["rsum"] = float(sum(results.values()))
    return results


def zero_shot_accuracy(image_embeds, class_text_embeds, labels) -> float:
    """Fraction of images whose most cosine-similar class text (``argmax_c <x_i, t_c>``) is their label."""
    image = to_numpy(image_embeds, np.float64)
    classes = to_numpy(class_text_embeds, np.float64)
    labels = to_numpy(labels, np.int64)
    if image.ndim != 2 or classes.ndim != 2 or image.shape[1] != classes.shape[1]:
        raise ValueError(f"embedding shapes do not match: images {image.shape}, class texts {classes.shape}")
    if labels.shape != (image.shape[0],):
        raise ValueError(f"labels has shape {labels.shape}, expected ({image.shape[0]},)")
    if labels.size and (labels.min() < 0 or labels.max() >= classes.shape[0]):
        raise ValueError(f"labels must lie in [0, {classes.shape[0]}) (one class text per label)")
    image = image / np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
    classes = classes / np.maximum(np.linalg.norm(classes, axis=1, keepdims=True), 1e-12)
    predictions = (image @ classes.T).argmax(axis=1)
    return float(np.mean(predictions == labels)) if labels.size else float("nan")
