"""Noisy-correspondence detection quality: AUROC and precision/recall at a threshold (plain numpy).

Convention: *clean* pairs are the positive class and ``clean_scores`` (e.g. GSC weights w, DISSect/CLIP
similarity) are higher for pairs believed clean; a pair is predicted clean when ``score > threshold``.
"""

from __future__ import annotations

import numpy as np

from .retrieval import to_numpy


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [values.size]))
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores, positives) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2."""
    scores = to_numpy(scores, np.float64).ravel()
    positives = to_numpy(positives).astype(bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def noise_detection_scores(clean_scores, is_noisy, threshold: float = 0.5) -> dict[str, float]:
    """auroc (clean = positive), precision/recall of the clean class at ``threshold``, clean_recall, noisy_recall.

    Undefined values (no clean or no noisy pair, nothing predicted clean) are NaN.
    """
    scores = to_numpy(clean_scores, np.float64).ravel()
    noisy = to_numpy(is_noisy).astype(bool).ravel()
    if scores.shape != noisy.shape:
        raise ValueError(f"clean_scores has {scores.size} values but is_noisy has {noisy.size}")
    if scores.size == 0:
        raise ValueError("noise_detection_scores needs at least one pair")
    if np.isnan(scores).any():
        raise ValueError("clean_scores contains NaN")
    clean = ~noisy
    predicted_clean = scores > threshold
    true_clean = int((predicted_clean & clean).sum())

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    recall = ratio(true_clean, int(clean.sum()))
    return {
        "auroc": auroc(scores, clean),
        "precision": ratio(true_clean, int(predicted_clean.sum())),
        "recall": recall,
        "clean_recall": recall,
        "noisy_recall": ratio(int((~predicted_clean & noisy).sum()), int(noisy.sum())),
    }
