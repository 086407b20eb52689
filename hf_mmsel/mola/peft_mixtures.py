"""peft's own task-routed mixture, Poly (Polytropon, Ponti et al. 2023), on the multi-task batches MoLA is compared on.

peft's Poly mixes ``n_skills`` LoRA "skills" per layer with learned per-task weights, and reads the task of each sample
from a ``task_ids`` argument that only ``PolyModel.forward`` hands to its layers; ``PeftModel.forward`` (what a
``Trainer`` calls) bypasses it. :func:`route_poly_by_task_ids` hands each forward's ``task_ids`` keyword (the one
``MultiTaskCollator`` batches carry; kept for the model's per-task heads when its ``forward`` declares them) to every
Poly layer, so a Poly model trains
and serves on the same batches and through the same calls as MoLA-Grad. :func:`poly_config` gives it MoLA's
trainable budget: ``n_skills = num_tasks`` skills of rank ``r`` (MoLA: ``num_tasks`` experts of rank ``r``).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .router_input import forward_parameter_names


def poly_config(num_tasks: int, r: int, target_modules: Any, modules_to_save: Optional[list[str]] = None):
    """``PolyConfig`` with MoLA-Grad's budget: ``num_tasks`` skills of rank ``r`` per layer, one split."""
    from peft import PolyConfig

    return PolyConfig(r=r, n_tasks=num_tasks, n_skills=num_tasks, n_splits=1, target_modules=target_modules,
                      modules_to_save=modules_to_save)


def route_poly_by_task_ids(peft_model: nn.Module) -> list:
    """Hand the ``task_ids`` keyword of every forward of ``peft_model`` to its Poly layers; returns the hook handles.

    Raises:
        ValueError: ``peft_model`` has no Poly layer.
    """
    from peft.tuners.poly.layer import PolyLayer

    root = peft_model.base_model.model
    layers = [m for m in root.modules() if isinstance(m, PolyLayer)]
    if not layers:
        raise ValueError("route_poly_by_task_ids: the model has no peft Poly layer (get_peft_model with PolyConfig).")
    current: dict[str, Any] = {}
    keeps_ids = "task_ids" in forward_parameter_names(root)  # e.g. per-task heads; else the ids are taken out

    def remember(module, args, kwargs):
        current["task_ids"] = kwargs.get("task_ids") if keeps_ids else kwargs.pop("task_ids", None)
        return args, kwargs

    def hand_over(module, args, kwargs):
        if current.get("task_ids") is not None:
            kwargs["task_ids"] = current["task_ids"]
        return args, kwargs

    handles = [root.register_forward_pre_hook(remember, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(hand_over, with_kwargs=True) for layer in layers]
    return handles
