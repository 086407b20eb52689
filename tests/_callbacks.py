"""Trainer callbacks shared by the trainer tests."""

from transformers import TrainerCallback


class StopAtStep(TrainerCallback):
    """Interrupt training after global step ``step`` (simulates a crash for resume tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
