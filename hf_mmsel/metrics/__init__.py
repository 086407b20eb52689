"""Evaluation metrics: plain numpy functions, model-level helpers and (lazily imported) ``evaluate.Metric``s.

Functions: ``retrieval_scores``, ``zero_shot_accuracy``, ``noise_detection_scores``, ``auroc``,
``multitask_accuracy``; model helpers ``embed_dataset``, ``embed_texts``, ``evaluate_retrieval``.
Metric classes ``RetrievalMetric``, ``ZeroShotAccuracy``, ``NoiseDetection``, ``MultiTaskAccuracy`` live in
``hf_mmsel.metrics.modules`` and are loaded on first attribute access (``import evaluate`` is slow).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .detection import auroc, noise_detection_scores
from .multitask import multitask_accuracy
from .retrieval import relevance_matrix, retrieval_scores, zero_shot_accuracy

_LAZY = {
    "RetrievalMetric": ".modules",
    "ZeroShotAccuracy": ".modules",
    "NoiseDetection": ".modules",
    "MultiTaskAccuracy": ".modules",
    "embed_dataset": ".evaluation",
    "embed_texts": ".evaluation",
    "evaluate_retrieval": ".evaluation",
}

__all__ = [
    "auroc",
    "multitask_accuracy",
    "noise_detection_scores",
    "relevance_matrix",
    "retrieval_scores",
    "zero_shot_accuracy",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_mmsel.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from .evaluation import embed_dataset, embed_texts, evaluate_retrieval  # noqa: F401
    from .modules import MultiTaskAccuracy, NoiseDetection, RetrievalMetric, ZeroShotAccuracy  # noqa: F401
