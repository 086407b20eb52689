"""What both trainers change in transformers' defaults so a run reads well on any machine.

- ``dataloader_pin_memory`` is switched off when there is no accelerator (torch warns on every DataLoader
  otherwise: once per epoch and evaluation).
- transformers' ``ProgressCallback`` prints every logged float as a string (``'loss': '7.567'``); it is replaced by
  one that keeps numbers (``'loss': 7.567``).
"""

from __future__ import annotations

__all__ = ["NumericProgressCallback", "no_pin_memory_without_accelerator", "use_numeric_progress"]

from transformers.trainer_callback import ProgressCallback


class NumericProgressCallback(ProgressCallback):
    """transformers' progress bar, but logged floats stay numbers (4 significant digits)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                     for k, v in (logs or {}).items() if k != "total_flos"}
            self.training_bar.write(str(shown))


def no_pin_memory_without_accelerator(training_args) -> None:
    """Turn ``dataloader_pin_memory`` off for CPU runs (``use_cpu`` or no CUDA device)."""
    import torch

    if training_args.dataloader_pin_memory and (training_args.use_cpu or not torch.cuda.is_available()):
        training_args.dataloader_pin_memory = False


def use_numeric_progress(trainer) -> None:
    """Replace the trainer's ``ProgressCallback`` by :class:`NumericProgressCallback` (a trainer without a progress
    bar, ``disable_tqdm``, keeps its ``PrinterCallback``)."""
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(NumericProgressCallback())
