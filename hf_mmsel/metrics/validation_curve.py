"""The time-to-quality curve of a training run: validation rSum against the train wall / CPU seconds spent,
early stopping read off it (the test rSum at the best validation point) and the time to reach a target."""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["ValidationCurve", "add_time_to_full_best", "best_validation_point", "time_to_reach"]


class ValidationCurve:
    """The time-to-quality curve of one run: every ``interval_steps`` optimizer steps (and at the last), the
    validation rSum (pair level; ``val_class_rsum`` beside it) against the train wall / CPU seconds spent so far
    (``offset_*``: a reference model's cost charged to the run; this callback's own time excluded). Early stopping:
    whenever the validation rSum improves on every earlier evaluation, the test split is scored too (``test_rsum``,
    ``test_class_rsum`` on that row), so the test rSum of the best validation checkpoint is known without saving it. ``log_cosines`` (``--log_curves``) adds the mean image-text
    cosine of clean and of noisy training pairs (the memorisation diagnostic). Its own time is accumulated in
    ``seconds`` / ``cpu_seconds`` and subtracted from the run's reported ``train_seconds`` / ``train_cpu_seconds``."""

    def __init__(self, data, collator, tokenizer, interval_steps: int, log_cosines: bool = False,
                 offset_seconds: float = 0.0, offset_cpu_seconds: float = 0.0) -> None:
        from torch.utils.data import DataLoader

        self.validation, self.collator, self.tokenizer = data.get("validation"), collator, tokenizer
        self.test = data.get("test")
        self.best_val_rsum = -math.inf
        self.train_loader = DataLoader(data["train"], batch_size=512, collate_fn=collator) if log_cosines else None
        self.interval_steps = max(1, int(interval_steps))
        self.offset_seconds, self.offset_cpu_seconds = offset_seconds, offset_cpu_seconds
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.start()

    def start(self) -> None:
        """Zero the clocks (call right before ``trainer.train()``)."""
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def __call__(self, model, step: int, epoch: float) -> None:
        from hf_mmsel.metrics import embed_dataset, evaluate_retrieval

        t0, cpu0 = time.perf_counter(), time.process_time()
        row = {"step": step, "epoch": round(epoch, 4),
               "train_seconds": t0 - self.t0 - self.seconds + self.offset_seconds,
               "train_cpu_seconds": cpu0 - self.cpu0 - self.cpu_seconds + self.offset_cpu_seconds}
        if self.validation is not None:
            val = evaluate_retrieval(model, self.validation, self.collator, batch_size=512, tokenizer=self.tokenizer)
            row["val_rsum"] = val["rsum"]
            if "class_rsum" in val:
                row["val_class_rsum"] = val["class_rsum"]
            if val["rsum"] > self.best_val_rsum and self.test is not None:
                self.best_val_rsum = val["rsum"]
                test = evaluate_retrieval(model, self.test, self.collator, batch_size=512, tokenizer=self.tokenizer)
                row["test_rsum"] = test["rsum"]
                if "class_rsum" in test:
                    row["test_class_rsum"] = test["class_rsum"]
        if self.train_loader is not None:
            emb = embed_dataset(model, self.train_loader)
            cos = (emb["image_embeds"] * emb["text_embeds"]).sum(-1)
            noisy = emb["is_noisy"].bool()
            row.update(clean_cos=float(cos[~noisy].mean()),
                       noisy_cos=float(cos[noisy].mean()) if bool(noisy.any()) else float("nan"))
        self.rows.append(row)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - cpu0


def best_validation_point(curve: list[dict[str, float]] | None) -> dict[str, Any]:
    """Early stopping on the curve: the first evaluation with the highest validation rSum, as
    ``best_val_rsum``, ``best_val_test_rsum`` / ``best_val_test_class_rsum`` (test scored there),
    ``best_val_cpu_seconds`` (train CPU seconds spent until then) and ``best_val_epoch``; ``None`` values
    without a validation curve."""
    rows = [c for c in curve or [] if "val_rsum" in c]
    if not rows:
        return {key: None for key in ("best_val_rsum", "best_val_test_rsum", "best_val_test_class_rsum",
                                      "best_val_cpu_seconds", "best_val_epoch")}
    best = max(rows, key=lambda c: c["val_rsum"])  # max() keeps the first of equal values
    return {"best_val_rsum": best["val_rsum"], "best_val_test_rsum": best.get("test_rsum"),
            "best_val_test_class_rsum": best.get("test_class_rsum"),
            "best_val_cpu_seconds": best["train_cpu_seconds"], "best_val_epoch": best["epoch"]}


def time_to_reach(curve: list[dict[str, float]], target: float, key: str = "train_cpu_seconds") -> float | None:
    """The first ``key`` time at which the curve's validation rSum reaches ``target`` (``None``: never)."""
    return next((row[key] for row in curve if row.get("val_rsum", -math.inf) >= target), None)


def add_time_to_full_best(rows: list[dict[str, Any]]) -> None:
    """Per run of one seed and loss type: ``time_to_full_best_cpu_seconds`` (first train CPU time at which its validation rSum
    reaches the best validation rSum of the seed's ``full`` run; ``None`` if never) and ``time_to_full_best_ratio``
    (that time over the time ``full`` itself needs to reach its best). ``None`` throughout without a ``full`` run
    or a validation curve."""
    full = next((r for r in rows if r["strategy"] == "full" and r.get("curve")), None)
    best = max((c["val_rsum"] for c in full["curve"] if "val_rsum" in c), default=None) if full else None
    full_time = time_to_reach(full["curve"], best) if best is not None else None
    for row in rows:
        reached = time_to_reach(row["curve"], best) if best is not None and row.get("curve") else None
        row["full_best_val_rsum"] = best
        row["time_to_full_best_cpu_seconds"] = reached
        row["time_to_full_best_ratio"] = reached / full_time if reached is not None and full_time else None
