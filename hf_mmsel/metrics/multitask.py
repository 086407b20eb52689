"""Per-task and mean accuracy for multi-task (MoLA) evaluation (plain numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .retrieval import to_numpy


def multitask_accuracy(predictions, labels, task_ids, task_names: Sequence[str] | None = None) -> dict[str, float]:
    """``acc_<task>`` for every task and ``mean_acc`` = unweighted mean over tasks (fractions in [0, 1]).

    ``predictions`` are class indices ``[N]`` or logits ``[N, C]`` (argmax taken). Tasks are named by
    ``task_names[task_id]`` (default: the task id). A named task without samples gets NaN and is left out of
    ``mean_acc``.
    """
    predictions = to_numpy(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)
    predictions = predictions.astype(np.int64).ravel()
    labels = to_numpy(labels, np.int64).ravel()
    task_ids = to_numpy(task_ids, np.int64).ravel()
    if not (predictions.size == labels.size == task_ids.size):
        raise ValueError(
            f"predictions ({predictions.size}), labels ({labels.size}) and task_ids ({task_ids.size}) differ in length"
        )
    present = sorted(set(task_ids.tolist()))
    if task_names is not None:
        task_names = list(task_names)
        unknown = [t for t in present if not 0 <= t < len(task_names)]
        if unknown:
            raise ValueError(f"task ids {unknown} have no name in task_names={task_names}")
        tasks = list(range(len(task_names)))
    else:
        tasks = present
    results: dict[str, float] = {}
    accs = []
    for t in tasks:
        mask = task_ids == t
        acc = float(np.mean(predictions[mask] == labels[mask])) if mask.any() else float("nan")
        results[f"acc_{task_names[t] if task_names is not None else t}"] = acc
        if mask.any():
            accs.append(acc)
    results["mean_acc"] = float(np.mean(accs)) if accs else float("nan")
    return results
