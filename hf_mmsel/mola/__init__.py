"""MoLA (Mixture of Low-rank Adapters, Zhou et al., ICML 2024) as a third-party peft tuner.

Importing this package (``import hf_mmsel`` does it) registers peft_type ``"MOLA"`` / prefix ``"mola_"`` with peft.
Loading a saved MoLA adapter in a fresh process needs that import first, otherwise peft raises ``KeyError: 'MOLA'``;
``load_mola_adapter(base_model, path_or_repo)`` does the import for you and explains the error.

Public API: ``MolaConfig``, ``MolaModel`` (``model.base_model`` of a MoLA PeftModel: ``routing()``,
``mola_aux_loss()``, ``merge_task()``, ``merge_adapter(task_id=)``, ``merge_and_unload(task_id=)``,
``export_expert_as_lora()``; ``generate(..., task_ids=)`` on transformers models), ``MolaLayer`` (``Linear``,
``Conv2d``), ``MolaMergedTaskError``, ``MolaRouter``, ``MolaRouterLayer``, ``task_wise_decorrelation_loss``,
``export_expert_as_lora``, ``load_mola_adapter``, ``register_mola``. ``hf_mmsel.mola.peft_mixtures`` wires peft's
own task-routed mixture (Poly) to the same multi-task batches, for the benchmarks.
"""

from __future__ import annotations

from .config import MolaConfig
from .export import export_expert_as_lora
from .layer import Conv2d, Linear, MolaLayer, MolaMergedTaskError
from .loading import MOLA_NOT_REGISTERED_MESSAGE, MolaNotRegisteredError, load_mola_adapter
from .model import MolaModel
from .registration import register_mola
from .router import MolaRouter, MolaRouterLayer, gates_from_logits
from .twd import task_wise_decorrelation_loss

__all__ = [
    "MolaConfig",
    "MolaModel",
    "MolaLayer",
    "MolaMergedTaskError",
    "Linear",
    "Conv2d",
    "MolaRouter",
    "MolaRouterLayer",
    "gates_from_logits",
    "task_wise_decorrelation_loss",
    "export_expert_as_lora",
    "load_mola_adapter",
    "MolaNotRegisteredError",
    "MOLA_NOT_REGISTERED_MESSAGE",
    "register_mola",
]
