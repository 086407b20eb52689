"""`MolaTrainer`: HF Trainer glue for multi-task training with MoLA adapters (or any model taking ``task_ids``).

* batches carry ``task_ids`` (``MultiTaskCollator``); the trainer passes them to the model, where MoLA's pre-hook
  routes each sample to its expert and ``MultiTaskClassifier`` picks each sample's head;
* in router mode it adds ``model.base_model.mola_aux_loss(task_ids)`` (weighted TwD) to the training loss and logs
  it separately as ``aux_loss``;
* evaluation reports ``eval_acc_<task>`` and ``eval_mean_acc`` (``hf_mmsel.metrics.multitask_accuracy``): the
  task ids reach ``compute_metrics`` as the second label (``label_names=["labels", "task_ids"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from .logging_defaults import no_pin_memory_without_accelerator, use_numeric_progress

__all__ = ["MolaTrainer", "MolaTrainingArguments", "multitask_compute_metrics"]


@dataclass
class MolaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with multi-task defaults: extra batch fields are kept and ``task_ids`` is a label."""

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: `task_id` must reach the collator."}
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels", "task_ids"],
        metadata={"help": "Batch keys passed to compute_metrics as labels; task_ids give per-task accuracy."},
    )
    aux_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Multiplier on model.base_model.mola_aux_loss (already weighted by MolaConfig.twd_weight)."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Heads of tasks absent from a batch get zero gradients, not None."}
    )


def multitask_compute_metrics(task_names: Sequence[str] | None = None):
    """A ``compute_metrics`` for ``EvalPrediction(predictions, label_ids=(labels, task_ids))``."""
    from hf_mmsel.metrics import multitask_accuracy

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        label_ids = eval_pred.label_ids
        if not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2:
            raise ValueError(
                "multi-task metrics need label_ids=(labels, task_ids): set label_names=['labels', 'task_ids']"
            )
        labels, task_ids = label_ids
        predictions = eval_pred.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        return multitask_accuracy(predictions, labels, task_ids, task_names)

    return compute_metrics


def _argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


class MolaTrainer(Trainer):
    """Trainer for multi-task batches ``{"pixel_values"/..., "labels", "task_ids"}``.

    Args (besides ``Trainer``'s): ``task_names`` names the tasks in the metrics (default: the model's
    ``spec.task_names`` when it has one, else the task ids). ``data_collator`` defaults to ``MultiTaskCollator``
    and ``compute_metrics`` to per-task + mean accuracy.
    """

    # the multi-task loss is a per-batch mean: Trainer divides it by the gradient-accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, task_names: Sequence[str] | None = None, **kwargs: Any):
        from hf_mmsel.data.multitask import MultiTaskCollator

        model = kwargs.get("model", args[0] if args else None)
        if task_names is None:
            spec = getattr(_unwrap_peft(model), "spec", None) if model is not None else None
            task_names = list(spec.task_names) if spec is not None else None
        self.task_names = list(task_names) if task_names is not None else None
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = MultiTaskCollator()
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = multitask_compute_metrics(self.task_names)
            if kwargs.get("preprocess_logits_for_metrics") is None:
                kwargs["preprocess_logits_for_metrics"] = _argmax_logits
        super().__init__(*args, **kwargs)
        no_pin_memory_without_accelerator(self.args)  # read when the DataLoaders are built
        use_numeric_progress(self)
        if "task_ids" not in (self.label_names or []):
            raise ValueError(f"MolaTrainer needs 'task_ids' in label_names, got {self.label_names}")
        # the loss is computed by the model; never inject num_items_in_batch into its forward
        self.model_accepts_loss_kwargs = False
        self._aux_loss_sum = torch.zeros(())
        self._aux_loss_steps = 0

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "task_ids" not in inputs:
            raise KeyError(f"MolaTrainer: batch has no 'task_ids'; keys are {sorted(inputs)}")
        task_ids = inputs["task_ids"]
        outputs = model(**self._model_inputs(model, inputs))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss: pass `labels` in the batch")
        if model.training and self._uses_router(model):
            aux = self.args.aux_loss_weight * self._tuner(model).mola_aux_loss(task_ids)
            loss = loss + aux
            self._aux_loss_sum = self._aux_loss_sum + aux.detach().float().cpu()
            self._aux_loss_steps += 1
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _model_inputs(model, inputs: dict) -> dict:
        """The batch as the model takes it. MoLA models get ``task_ids``, renamed ``mola_task_ids`` under a
        ``PeftModelFor*`` task class (e.g. ``task_type="CAUSAL_LM"``), whose ``forward`` swallows ``task_ids`` for
        third-party tuners; a model without MoLA gets them only if its own ``forward`` declares ``task_ids`` (e.g.
        per-task heads), so one collator serves MoLA and a shared-LoRA baseline alike."""
        import inspect

        inputs = dict(inputs)
        peft_model = _unwrap_peft(model, keep_peft=True)
        tuner = getattr(peft_model, "base_model", None)
        if hasattr(tuner, "merged_tasks") and hasattr(tuner, "routing"):  # a MolaModel
            if "task_ids" in inspect.signature(type(peft_model).forward).parameters and type(peft_model).__name__ != "PeftModel":
                inputs["mola_task_ids"] = inputs.pop("task_ids")
            return inputs
        root = _unwrap_peft(model)
        try:
            accepts = "task_ids" in inspect.signature(root.forward).parameters
        except (TypeError, ValueError):
            accepts = True
        if not accepts:
            inputs.pop("task_ids")
        return inputs

    @staticmethod
    def _tuner(model) -> Any:
        return getattr(_unwrap_peft(model, keep_peft=True), "base_model", None)

    def _uses_router(self, model) -> bool:
        tuner = self._tuner(model)
        if tuner is None or not hasattr(tuner, "mola_aux_loss"):
            return False
        configs = getattr(tuner, "peft_config", {}) or {}
        active = getattr(tuner, "active_adapters", list(configs))
        return any(getattr(configs.get(name), "routing", None) == "router" for name in active)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._aux_loss_steps and "loss" in logs:
            mean_aux = self._aux_loss_sum / self._aux_loss_steps
            if self.args.world_size > 1:
                mean_aux = self.accelerator.gather(mean_aux.to(self.args.device).reshape(1)).mean().cpu()
            logs["aux_loss"] = round(float(mean_aux), 6)
            self._aux_loss_sum = torch.zeros(())
            self._aux_loss_steps = 0
        super().log(logs, start_time)


def _unwrap_peft(model, keep_peft: bool = False):
    """The module under DDP/accelerate wrappers; with ``keep_peft=False`` also under a ``PeftModel``."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    if keep_peft:
        return model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
