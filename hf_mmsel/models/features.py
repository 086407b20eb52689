"""Embedding extraction for any dual encoder with ``get_image_features`` / ``get_text_features``.

Works for ``CLIPModel``, ``SiglipModel``, ``Siglip2Model``, ``VisionTextDualEncoderModel`` and custom models;
unwraps DDP / accelerate / ``torch.compile`` wrappers first. In transformers 5 the feature getters return a
``ModelOutput`` whose ``pooler_output`` holds the projected (not normalised) embedding; older code and custom
models return a tensor: both work, and :func:`encode_pair` L2-normalises.

SigLIP towers (also inside a ``VisionTextDualEncoderModel``) get two input adapters, registered once as forward
pre-hooks by :func:`adapt_siglip_inputs` so that every call path (feature getters, ``forward`` under DDP) sees
them: the text tower pools the hidden state at the LAST position, so shorter ``input_ids`` are right-padded to
``max_position_embeddings`` (SigLIP's ``padding="max_length"`` convention) and the pooled token never depends on
how a batch was padded; a SigLIP2 vision tower takes patchified pixels, so a ``[B, 3, H, W]`` batch is cut into
``(H/p)·(W/p)`` patches with an all-ones ``pixel_attention_mask`` and ``spatial_shapes = (H/p, W/p)``.

The same function adapts the towers of a ``VisionTextDualEncoderModel`` (forward hooks, so every call path sees
them): a text tower from a sentence-transformers model is pooled as that model prescribes (its config's
``text_pooling`` / ``text_normalize``, set by :func:`~hf_mmsel.models.build_dual_encoder` and saved with the
model: the tower's ``pooler_output`` becomes :func:`pool_tokens` of its last hidden state, so the projection sees
the sentence-transformers embedding; BERT's own pooler is then unused and frozen), and a convolutional vision
tower's ``[B, C, 1, 1]`` pooled output (ResNet) is flattened to ``[B, C]``.
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


SIGLIP_TEXT_TOWERS = ("SiglipTextModel", "Siglip2TextModel")  # pool the last position
SIGLIP2_VISION_TOWERS = ("Siglip2VisionModel",)  # take patchified pixels
_ADAPTED = "_hf_mmsel_siglip_inputs"


def _pad_siglip_text(module, args, kwargs):
    """Forward pre-hook: right-pad ``input_ids`` / ``attention_mask`` to ``max_position_embeddings``."""
    positional = "input_ids" not in kwargs and len(args) > 0
    input_ids = args[0] if positional else kwargs.get("input_ids")
    config = module.config
    length = int(config.max_position_embeddings)
    if input_ids is None or input_ids.shape[-1] >= length:
        return None
    pad = length - input_ids.shape[-1]
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    kwargs = dict(kwargs)
    kwargs["input_ids"] = F.pad(input_ids, (0, pad), value=int(pad_id))
    mask = kwargs.get("attention_mask")
    if mask is None and positional and len(args) > 1:
        mask, args = args[1], args[:1] + args[2:]
    if mask is not None:
        kwargs["attention_mask"] = F.pad(mask, (0, pad), value=0)
    return (args[1:] if positional else args), kwargs


def siglip2_patches(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """``[B, C, H, W]`` pixels -> SigLIP2 inputs: ``pixel_values [B, N, p*p*C]`` (row-major patches, each
    ``(p, p, C)``-flattened as ``Siglip2ImageProcessor`` does), ``pixel_attention_mask [B, N]`` (ones) and
    ``spatial_shapes [B, 2] = (H/p, W/p)``."""
    b, c, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the SigLIP2 patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patches = pixel_values.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(b, gh * gw, patch_size * patch_size * c)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device),
        "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device),
    }


def _patchify_siglip2(module, args, kwargs):
    """Forward pre-hook: a 4-D ``pixel_values`` batch becomes SigLIP2's patch inputs."""
    positional = "pixel_values" not in kwargs and len(args) > 0
    pixel_values = args[0] if positional else kwargs.get("pixel_values")
    if pixel_values is None or pixel_values.dim() != 4:
        return None
    if any(kwargs.get(k) is not None for k in ("pixel_attention_mask", "spatial_shapes")) or len(args) > 1:
        raise ValueError("pass SigLIP2 either patchified pixel_values with pixel_attention_mask and spatial_shapes, "
                         "or a [B, 3, H, W] batch alone")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_attention_mask", "spatial_shapes")}
    kwargs.update(siglip2_patches(pixel_values, int(module.config.patch_size)))
    return (), kwargs


def adapt_siglip_inputs(model):
    """Register the tower adapters (module docstring) of ``model``: the SigLIP input adapters on every SigLIP text
    tower and SigLIP2 vision tower, the sentence-transformers pooling of a ``VisionTextDualEncoderModel`` whose
    config sets ``text_pooling``, and the flattening of 4-D pooled vision outputs; idempotent, a no-op for other
    models. Returns ``model``."""
    for module in unwrap_model(model).modules():
        name = type(module).__name__
        hook = None
        if name in SIGLIP_TEXT_TOWERS:
            hook = _pad_siglip_text
        elif name in SIGLIP2_VISION_TOWERS:
            hook = _patchify_siglip2
        if hook is not None and not getattr(module, _ADAPTED, False):
            module.register_forward_pre_hook(hook, with_kwargs=True)
            setattr(module, _ADAPTED, True)
        if name == "VisionTextDualEncoderModel":
            _adapt_dual_encoder_towers(module)
    return model


# ------------------------------------------------------------------------------ pooling of pretrained towers
#: pooling modes of sentence-transformers' Pooling module that :func:`pool_tokens` implements
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
TEXT_POOLING_ATTR = "text_pooling"  # config attribute of a VisionTextDualEncoderModel
TEXT_NORMALIZE_ATTR = "text_normalize"
_POOLED = "_hf_mmsel_text_pooling"
_FLATTENED = "_hf_mmsel_flatten_pooled"


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """``[B, L, D]`` token states -> ``[B, D]``, as sentence-transformers' Pooling does: ``mean`` (over unmasked
    tokens), ``cls`` (first token), ``max`` (over unmasked tokens), ``mean_sqrt_len`` (sum / sqrt(length)),
    ``weightedmean`` (position-weighted mean, weights 1..L) or ``lasttoken`` (last unmasked token)."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "weightedmean":
        mask = mask * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
    if mode not in ("mean", "mean_sqrt_len", "weightedmean"):
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {list(POOLING_MODES)}")
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def _text_pooling_hook(mode: str, normalize: bool):
    def hook(module, args, kwargs, output):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        pooled = pool_tokens(hidden, mask, mode)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        if isinstance(output, tuple):
            return (output[0], pooled) + tuple(output[2:])
        output["pooler_output"] = pooled
        return output

    return hook


def _flatten_pooled_hook(module, args, kwargs, output):
    pooled = output[1] if isinstance(output, tuple) and len(output) > 1 else getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 4 or pooled.shape[-2:] != (1, 1):
        return None
    pooled = pooled.flatten(1)
    if isinstance(output, tuple):
        return (output[0], pooled) + tuple(output[2:])
    output["pooler_output"] = pooled
    return output


def _adapt_dual_encoder_towers(model) -> None:
    config = model.config
    mode = getattr(config, TEXT_POOLING_ATTR, None)
    text = getattr(model, "text_model", None)
    if mode and text is not None and not getattr(text, _POOLED, False):
        if mode not in POOLING_MODES:
            raise ValueError(f"{TEXT_POOLING_ATTR}={mode!r} in the model config; choose one of {list(POOLING_MODES)}")
        text.register_forward_hook(_text_pooling_hook(mode, bool(getattr(config, TEXT_NORMALIZE_ATTR, False))),
                                   with_kwargs=True)
        pooler = getattr(text, "pooler", None)
        if isinstance(pooler, torch.nn.Module):  # unused now: frozen so DDP does not wait for its gradients
            pooler.requires_grad_(False)
        setattr(text, _POOLED, True)
    vision = getattr(model, "vision_model", None)
    if vision is not None and not getattr(vision, _FLATTENED, False):
        vision.register_forward_hook(_flatten_pooled_hook, with_kwargs=True)
        setattr(vision, _FLATTENED, True)


def image_features(model, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """Projected (not normalised) image embeddings ``[B, D]``."""
    inner = adapt_siglip_inputs(unwrap_model(model))
    return _as_embedding(inner.get_image_features(pixel_values=pixel_values, **kwargs), "image")


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Projected (not normalised) text embeddings ``[B, D]``."""
    inner = adapt_siglip_inputs(unwrap_model(model))
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
