"""``evaluate.Metric`` subclasses over the numpy metric functions; instantiate them locally, e.g.
``RetrievalMetric().compute(image_embeds=..., text_embeds=...)`` (never ``evaluate.load`` of a Hub name).

Imported lazily by ``hf_mmsel.metrics`` because ``import evaluate`` takes seconds.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from .detection import noise_detection_scores
from .multitask import multitask_accuracy
from .retrieval import retrieval_scores, zero_shot_accuracy

_CITATION = "hf_mmsel"


class RetrievalMetric(evaluate.Metric):
    """Image<->text Recall@K (percent) and rsum over rows of (image embedding, caption embedding) pairs.

    Pair level (``i2t_r1`` ... ``rsum``): row i's caption is the relevant text of row i's image; rows with the same
    ``caption_ids`` (compute kwarg, one id per row) count as the same caption. With ``labels`` (per row) the
    class-level scores (any caption of the same class is a hit) are added as ``class_i2t_r1`` ... ``class_rsum``.
    """

    def _info(self):
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation=_CITATION,
            inputs_description="image_embeds, text_embeds: [N, D] per pair; optional labels=[N], caption_ids=[N], "
                               "ks=(1, 5, 10)",
            features=datasets.Features(
                {
                    "image_embeds": datasets.Sequence(datasets.Value("float32")),
                    "text_embeds": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, image_embeds, text_embeds, labels=None, caption_ids=None, ks=(1, 5, 10)):
        image = np.asarray(image_embeds, dtype=np.float64)
        text = np.asarray(text_embeds, dtype=np.float64)
        image /= np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
        text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
        results = retrieval_scores(image @ text.T, ks=ks, caption_ids=caption_ids)
        if labels is not None:
            results.update({f"class_{k}": v for k, v in retrieval_scores(image @ text.T, labels, labels, ks=ks).items()})
        return results


class ZeroShotAccuracy(evaluate.Metric):
    """Zero-shot accuracy: argmax cosine similarity against ``class_text_embeds`` (compute kwarg) vs references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation=_CITATION,
            inputs_description="image_embeds [N, D], references [N] class ids; class_text_embeds [C, D] kwarg",
            features=datasets.Features(
                {"image_embeds": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, image_embeds, references, class_text_embeds=None):
        if class_text_embeds is None:
            raise ValueError("ZeroShotAccuracy.compute needs class_text_embeds=[n_classes, D]")
        return {"zero_shot_acc": zero_shot_accuracy(image_embeds, class_text_embeds, references)}


class NoiseDetection(evaluate.Metric):
    """Noisy-correspondence detection: AUROC (clean = positive), precision/recall at ``threshold`` (kwarg)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation=_CITATION,
            inputs_description="clean_scores [N] (higher = clean), is_noisy [N] bool; threshold=0.5",
            features=datasets.Features(
                {"clean_scores": datasets.Value("float64"), "is_noisy": datasets.Value("bool")}
            ),
        )

    def _compute(self, clean_scores, is_noisy, threshold=0.5):
        return noise_detection_scores(clean_scores, is_noisy, threshold=threshold)


class MultiTaskAccuracy(evaluate.Metric):
    """Per-task accuracy ``acc_<task>`` and their mean ``mean_acc``; ``task_names`` compute kwarg."""

    def _info(self):
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation=_CITATION,
            inputs_description="predictions [N] class ids, references [N], task_ids [N]; task_names kwarg",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "task_ids": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, task_ids, task_names=None):
        return multitask_accuracy(predictions, references, task_ids, task_names=task_names)
