"""peft's own mixtures of LoRAs next to MoLA on its multi-task batches: Poly (Polytropon, Ponti et al. 2023) and
X-LoRA (Buehler & Buehler 2024).

**Poly** mixes ``n_skills`` LoRA "skills" per layer with learned per-task weights, and reads the task of each sample
from a ``task_ids`` argument that only ``PolyModel.forward`` hands to its layers; ``PeftModel.forward`` (what a
``Trainer`` calls) bypasses it. :func:`route_poly_by_task_ids` hands each forward's ``task_ids`` keyword (the one
``MultiTaskCollator`` batches carry; kept for the model's per-task heads when its ``forward`` declares them) to every
Poly layer, so a Poly model trains and serves on the same batches and through the same calls as MoLA-Grad.
:func:`poly_config` gives it MoLA's trainable budget: ``n_skills = num_tasks`` skills of rank ``r`` (MoLA:
``num_tasks`` experts of rank ``r``).

**X-LoRA** mixes LoRA adapters trained beforehand (loaded from disk) with per-token scalings
``lambda = softmax(W h_L)`` predicted from the last hidden state ``h_L`` of a first pass without adapters; a second
pass applies ``sum_j lambda_j B_j A_j x`` in every adapted layer. It never sees task ids (a learned router). peft's
``XLoraModel`` is written for transformers language models; on a ViT it fails twice as is:
(1) its adapter loader re-roots every saved key at ``model.model.<...>`` (``tuners/xlora/model.py``,
``_load_adapter_into_lora_model``: "We always want model.model"), so an adapter saved on a ``ViTModel``
(``base_model.model.layers.0...``) is refused with ``ValueError: Got unexpected keys!``; (2) its scaling pass sizes
the dummy scalings from an ``input_ids`` / ``inputs_embeds`` argument (``XLoraClassifier.make_dummy_scalings``),
which a ViT called with ``pixel_values`` does not have. :class:`XLoraTokenModel` is the minimal adaptation: the ViT's
token layers (:class:`ViTTokenLayers`) held as ``.model`` and called with ``inputs_embeds`` (the patch embedding runs
once, outside, frozen; :class:`XLoraVisionBackbone`); peft's X-LoRA then runs unchanged.
:func:`save_lora_adapter` saves a per-task LoRA of the benchmark's multi-task model as an adapter of its backbone.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
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


# ------------------------------------------------------------------------------------------------ X-LoRA
class ViTTokenLayers(nn.Module):
    """The token layers of a transformers ViT (``vit.layers`` then ``vit.layernorm``, the same modules, so module
    names and adapter keys are the ViT's) as a map ``tokens [N, L, d] -> tokens [N, L, d]``: the body X-LoRA runs
    twice. The patch embedding (not adapted by the benchmark's LoRAs) stays outside, run once per forward."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if not hasattr(vit, "layers") or not hasattr(vit, "layernorm"):
            raise ValueError(f"ViTTokenLayers needs a transformers ViTModel (`layers`, `layernorm`), got {type(vit).__name__}")
        self.layers, self.layernorm = vit.layers, vit.layernorm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens, None)
        return self.layernorm(tokens)


class XLoraTokenModel(nn.Module):
    """The root peft's X-LoRA needs, around a ``body`` mapping token embeddings ``[N, L, d]`` to ``[N, L, d]``.

    peft's ``XLoraModel`` assumes a transformers language model: it reads ``model.config``; its first (scaling) pass
    sizes the dummy scalings ``[N, L, layers, adapters]`` from the ``input_ids`` / ``inputs_embeds`` argument
    (``XLoraClassifier.make_dummy_scalings``) and calls the root with ``output_hidden_states=True, return_dict=True``,
    reading ``.hidden_states[-1]``; and its adapter loader re-roots saved keys at ``model.model.<...>``
    (``_load_adapter_into_lora_model``: "We always want model.model"). Hence ``forward(inputs_embeds=...)`` returning
    a ``BaseModelOutput`` whose ``hidden_states`` are ``(inputs_embeds, body output)``, and the body held as
    ``.model``: a LoRA adapter saved from a peft model over the body loads by key.
    """

    def __init__(self, body: nn.Module, hidden_size: int, config: Optional[Any] = None) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.model = body
        self.config = config if config is not None else PretrainedConfig(hidden_size=hidden_size)
        if getattr(self.config, "use_cache", False):
            raise ValueError("XLoraTokenModel: peft's X-LoRA needs config.use_cache False")

    def forward(self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True,
                **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutput

        last = self.model(inputs_embeds)
        return BaseModelOutput(last_hidden_state=last, hidden_states=(inputs_embeds, last) if output_hidden_states else None)


def save_lora_adapter(peft_model: nn.Module, directory: str, submodule: str = "") -> str:
    """Save the LoRA of ``peft_model``'s ``submodule`` (e.g. ``"backbone"``; ``""``: the whole model) as a peft
    adapter of that submodule alone (``adapter_config.json`` + ``adapter_model.safetensors``, no
    ``modules_to_save``), loadable with ``PeftModel.from_pretrained(submodule, directory)`` and as an X-LoRA expert.

    Raises:
        ValueError: ``peft_model`` has no LoRA weight under ``submodule``.
    """
    import dataclasses
    import os

    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    config = peft_model.peft_config[peft_model.active_adapter]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"save_lora_adapter: the active adapter is a {type(config).__name__}, not a LoraConfig")
    prefix = "base_model.model." + (f"{submodule}." if submodule else "")
    weights = {"base_model.model." + key[len(prefix):]: value.detach().contiguous().cpu()
               for key, value in get_peft_model_state_dict(peft_model).items()
               if key.startswith(prefix) and ".lora_" in key}
    if not weights:
        raise ValueError(f"save_lora_adapter: no LoRA weight under {submodule!r}")
    os.makedirs(directory, exist_ok=True)
    dataclasses.replace(config, modules_to_save=None, base_model_name_or_path=None).save_pretrained(directory)
    save_file(weights, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def xlora_model(body: nn.Module, hidden_size: int, adapters: Sequence[str], trainable_adapters: bool = False,
                config: Optional[Any] = None, **xlora_kwargs: Any) -> nn.Module:
    """peft's X-LoRA (``XLoraConfig``, peft defaults: a one-layer scaling classifier, softmax over the adapters,
    the same scalings at every layer) over the LoRA ``adapters`` (saved adapter folders of ``body``; the i-th is
    named ``str(i)``: peft loads them under those names and activates the ``XLoraConfig.adapters`` keys), on
    :class:`XLoraTokenModel` ``(body)``; call it as ``model(inputs_embeds=tokens)``. Only the scaling classifier is
    trainable, plus the adapters with ``trainable_adapters``.

    Raises:
        ValueError: fewer than two adapters.
    """
    from peft import XLoraConfig, get_peft_model

    if len(adapters) < 2:
        raise ValueError(f"X-LoRA mixes at least two LoRA adapters, got {len(adapters)}")
    root = XLoraTokenModel(body, hidden_size, config=config)
    cfg = XLoraConfig(hidden_size=hidden_size, adapters={str(i): path for i, path in enumerate(adapters)}, use_trainable_adapters=trainable_adapters,
                      **xlora_kwargs)
    return get_peft_model(root, cfg)


def xlora_scaling_classifier(model: nn.Module) -> nn.Module:
    """The X-LoRA scaling classifier (the learned router) of an :func:`xlora_model`."""
    return model.base_model.internal_xlora_classifier


class XLoraVisionBackbone(nn.Module):
    """A ViT backbone whose token layers are peft's X-LoRA over per-task LoRA adapters; ``forward(pixel_values)``
    gives the ``BaseModelOutput`` of the last layer, so it drops into ``MultiTaskClassifier`` (per-task heads). The
    patch embedding is frozen and runs once; X-LoRA runs its two passes (scalings, then the scaled adapters) over the
    token layers. X-LoRA never sees a task id: the heads may, the mixture is learned."""

    def __init__(self, vit: nn.Module, adapters: Sequence[str], trainable_adapters: bool = False,
                 **xlora_kwargs: Any) -> None:
        super().__init__()
        self.embeddings = vit.embeddings.requires_grad_(False)
        self.xlora = xlora_model(ViTTokenLayers(vit), vit.config.hidden_size, adapters,
                                 trainable_adapters=trainable_adapters, config=vit.config, **xlora_kwargs)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        return self.xlora(inputs_embeds=self.embeddings(pixel_values.to(dtype)))
