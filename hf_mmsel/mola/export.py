"""Export one MoLA expert as a plain peft LoRA adapter (docs/design.md, MoLA §6.4 "Merge"), loadable with vanilla peft.

Expert t of every layer becomes ``lora_A``/``lora_B`` of a ``LoraConfig`` adapter: ``adapter_config.json`` +
``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, path)`` then reproduces MoLA's output for task t in
a process that never imports hf_mmsel. Factorized experts are copied as they are (same r and alpha); ``loralib``
conv experts dW_t = reshape(B_t A_t) * s are converted by SVD of dW_t as an [out, in*k*k] matrix, keeping its numerical
rank (the reshape does not preserve the r*k bound, so this can reach min(out, in*k*k)); alpha = rank, i.e. s = 1.
``modules_to_save`` (e.g. task heads) are exported too.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from .layer import Conv2d, Linear, MolaLayer

SAFETENSORS_NAME = "adapter_model.safetensors"


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [out, in, k, k] -> (A [rank, in, k, k], B [out, rank, 1, 1]) with B A == delta (up to rounding)."""
    out_ch = delta.shape[0]
    u, s, vh = torch.linalg.svd(delta.reshape(out_ch, -1).double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).reshape(rank, *delta.shape[1:])
    b = (u[:, :rank] * root[None, :]).reshape(out_ch, rank, 1, 1)
    return a.to(delta.dtype), b.to(delta.dtype)


def _lora_factors(layer: MolaLayer, adapter: str, task_id: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_A.weight, lora_B.weight, r, lora_alpha) of expert ``task_id``."""
    if isinstance(layer, Conv2d):
        base = layer.get_base_layer()
        if tuple(base.dilation) != (1, 1):
            raise ValueError("Cannot export a dilated Conv2d expert as peft LoRA (peft's lora_A conv has no dilation).")
        if layer.conv_style[adapter] == "loralib":
            delta = layer.get_delta_weight(adapter, task_id).detach()
            s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
            rank = max(1, int((s > s[0] * 1e-7).sum())) if s[0] > 0 else 1
            a, b = _svd_factors(delta, rank)
            return a, b, rank, float(rank)
    a, b = layer.expert_factors(adapter, task_id)
    return a.detach(), b.detach(), layer.r[adapter], layer.lora_alpha[adapter]


def _as_config_number(value: float) -> Any:
    return int(value) if float(value).is_integer() else float(value)


def export_expert_as_lora(
    model: nn.Module, task_id: int, save_directory: str, adapter_name: str = "default", **lora_config_kwargs: Any
) -> str:
    """Write expert ``task_id`` of MoLA adapter ``adapter_name`` as a peft LoRA adapter in ``save_directory``.

    ``model`` is the ``PeftModel`` or its ``MolaModel`` (``peft_model.base_model``). Returns the directory.
    """
    from peft import LoraConfig
    from peft.utils import ModulesToSaveWrapper
    from safetensors.torch import save_file

    from .model import MolaModel

    tuner = model if isinstance(model, MolaModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, MolaModel):
        raise TypeError(f"export_expert_as_lora needs a MoLA PeftModel or its MolaModel, got {type(model).__name__}")
    if adapter_name not in getattr(tuner, "peft_config", {}):
        raise ValueError(f"No MoLA adapter named {adapter_name!r}; available: {list(getattr(tuner, 'peft_config', {}))}.")
    config = tuner.peft_config[adapter_name]
    if config.routing == "router" and config.num_experts > 1:
        raise ValueError("A MoLA-Router adapter mixes experts per input and cannot be exported as one LoRA adapter.")
    if not 0 <= int(task_id) < config.num_experts:
        raise ValueError(f"task_id={task_id} is out of range for num_experts={config.num_experts}.")

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    for name, module in tuner.model.named_modules():
        if not isinstance(module, (Linear, Conv2d)) or adapter_name not in module.mola_A:
            continue
        a, b, r, alpha = _lora_factors(module, adapter_name, int(task_id))
        state[f"base_model.model.{name}.lora_A.weight"] = a.clone().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = b.clone().contiguous()
        ranks[name], alphas[name] = r, _as_config_number(alpha)
    if not state:
        raise ValueError(f"MoLA adapter {adapter_name!r} has no adapted layers to export.")

    # modules_to_save (e.g. heads): the trained copies, under the keys peft's checkpoints use for them
    if config.modules_to_save:
        for name, module in tuner.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for key, value in module.modules_to_save[adapter_name].state_dict().items():
                    state[f"base_model.model.{name}.{key}"] = value.detach().clone().contiguous()

    default_r = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(ranks)
    conv1d = any(getattr(m, "fan_in_fan_out", False) for m in tuner.model.modules() if isinstance(m, Linear))
    if conv1d:  # GPT-2 style Conv1D layers: peft LoRA needs fan_in_fan_out (factors are the same)
        lora_config_kwargs.setdefault("fan_in_fan_out", True)
    lora_config = LoraConfig(
        r=default_r,
        lora_alpha=default_alpha,
        target_modules="(" + "|".join(re.escape(n) for n in names) + ")",
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != default_r},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != default_alpha},
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
        **lora_config_kwargs,
    )
    os.makedirs(save_directory, exist_ok=True)
    lora_config.save_pretrained(save_directory)
    save_file(state, os.path.join(save_directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    return save_directory

