"""Trainer glue of :class:`~hf_mmsel.metrics.validation_curve.ValidationCurve`: evaluate every
``interval_steps`` optimizer steps and at the last."""

from __future__ import annotations

from transformers import TrainerCallback


class ValidationCurveCallback(TrainerCallback):
    """Calls ``curve(model, global_step, epoch)`` every ``curve.interval_steps`` optimizer steps and at the last."""

    def __init__(self, curve) -> None:
        self.curve = curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.curve.interval_steps == 0 or state.global_step >= state.max_steps:
            self.curve(model, state.global_step, float(state.epoch))
