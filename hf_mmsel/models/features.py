"""Embedding extraction for any dual encoder with ``get_image_features`` / ``get_text_features``.

Works for ``CLIPModel``, ``VisionTextDualEncoderModel`` and custom models; unwraps DDP / accelerate /
``torch.compile`` wrappers first. In transformers 5 the feature getters return a ``ModelOutput`` whose
``pooler_output`` holds the projected embedding; older code and custom models return a tensor: both work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REQUIRED_METHODS = ("get_image_features", "get_text_features")
DEFAULT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


_MODULE_WRAPPERS = ("DeepSpeedEngine", "FullyShardedDataParallel", "PipelineEngine")


def make_logit_scale_1d(model) -> int:
    """Give every 0-dim ``logit_scale`` / ``logit_bias`` parameter of ``model`` shape ``[1]`` (DeepSpeed cannot
    broadcast 0-dim parameters: ``self.dim() cannot be 0 to view Float as Byte``). State dicts keep the original
    0-dim shape (a state-dict hook squeezes on save, a pre-hook unsqueezes on load), so checkpoints still load into
    the unmodified model class. Returns the number of parameters reshaped."""
    reshaped = 0
    for module in unwrap_model(model).modules():
        names = [n for n in ("logit_scale", "logit_bias")
                 if isinstance(getattr(module, n, None), torch.nn.Parameter) and getattr(module, n).dim() == 0]
        if not names:
            continue
        for n in names:
            old = getattr(module, n)
            setattr(module, n, torch.nn.Parameter(old.detach().reshape(1).clone(), requires_grad=old.requires_grad))
            reshaped += 1

        def squeeze(mod, state_dict, prefix, local_metadata, names=tuple(names)):
            for n in names:
                key = prefix + n
                if key in state_dict and state_dict[key].shape == (1,):
                    state_dict[key] = state_dict[key].reshape(())
            return state_dict

        def unsqueeze(state_dict, prefix, *args, names=tuple(names)):
            for n in names:
                key = prefix + n
                if key in state_dict and state_dict[key].dim() == 0:
                    state_dict[key] = state_dict[key].reshape(1)

        module._register_state_dict_hook(squeeze)
        module._register_load_state_dict_pre_hook(unsqueeze)
    return reshaped


def unwrap_model(model):
    """Strip DistributedDataParallel/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or (
                type(model).__name__ in _MODULE_WRAPPERS and isinstance(getattr(model, "module", None), torch.nn.Module)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
    return model


def check_dual_encoder(model) -> None:
    """Raise ``TypeError`` naming the missing methods unless ``model`` has get_image_features/get_text_features."""
    inner = unwrap_model(model)
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(inner, name, None))]
    if missing:
        raise TypeError(
            f"{type(inner).__name__} is not a dual encoder: missing method(s) {', '.join(missing)}; "
            f"a model needs {' and '.join(REQUIRED_METHODS)} (e.g. CLIPModel, VisionTextDualEncoderModel)"
        )


def _as_embedding(output, kind: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in (f"{kind}_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # (last_hidden_state, pooler_output, ...)
    raise TypeError(f"get_{kind}_features returned {type(output).__name__}; expected a tensor or an output with pooler_output")


def image_features(model, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """Projected (not normalised) image embeddings ``[B, D]``."""
    return _as_embedding(unwrap_model(model).get_image_features(pixel_values=pixel_values, **kwargs), "image")


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Projected (not normalised) text embeddings ``[B, D]``."""
    inner = unwrap_model(model)
    return _as_embedding(inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs), "text")


def encode_pair(
    model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image_embeds, text_embeds)``, each ``[B, D]``; gradients flow (no ``no_grad`` here)."""
    check_dual_encoder(model)
    image = image_features(model, pixel_values)
    text = text_features(model, input_ids, attention_mask)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def logit_scale_of(model, default: float = DEFAULT_LOGIT_SCALE, max_scale: float = 100.0) -> torch.Tensor:
    """The similarity scale ``exp(logit_scale)`` (CLIP's 1/tau), clamped at ``max_scale`` as CLIP does.

    Differentiable when the model has a ``logit_scale`` parameter; a constant ``default`` otherwise.
    """
    inner = unwrap_model(model)
    raw = getattr(inner, "logit_scale", None)
    if isinstance(raw, torch.Tensor):
        return raw.exp().clamp(max=max_scale)
    return torch.tensor(min(default, max_scale) if math.isfinite(default) else max_scale)
