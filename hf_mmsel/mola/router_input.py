"""What a MoLA-Router reads (``MolaConfig.router_input``): the router's kind and width, fixed when the adapter is
injected, and the tensor it routes on at each forward.

``router_input="module:<name>"``: an MLP on the pooled output of that module. ``router_input="input"``: the model
input; a conv router for image batches, an MLP for vectors / token features. When the model input is integer ids
(token ids), the router reads the (token-mean-pooled) output of the model's input embedding instead
(:func:`input_embedding`); an integer input of a model without an embedding layer is read as float values (as a
model that casts its ids itself, e.g. peft's test MLP, does).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MolaConfig
from .router import ROUTER_LAYER_NAME

ROUTER_INPUT_KWARGS = ("pixel_values", "input_values", "inputs_embeds", "input_features", "x", "input", "inputs")
# names of a root ``forward``'s first parameter that mean "images [N, C, H, W]" (router_kind="auto" -> conv router)
IMAGE_INPUT_NAMES = ("pixel_values", "images", "image")
_ID_INPUT_KWARGS = ("input_ids",)


def forward_parameter_names(model: nn.Module, ordered: bool = False):
    """Names of the explicit parameters of ``model.forward`` (not ``*args``/``**kwargs``); empty if not inspectable."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return () if ordered else frozenset()
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return tuple(names) if ordered else frozenset(names)


def _own_modules(model: nn.Module):
    """``model.named_modules()`` without the MoLA router holder."""
    for name, module in model.named_modules():
        if name.split(".")[0] != ROUTER_LAYER_NAME:
            yield name, module


def input_embedding(model: nn.Module) -> Optional[nn.Module]:
    """The model's input embedding: transformers' ``get_input_embeddings()`` when it is an ``nn.Embedding``, else the
    first ``nn.Embedding`` in module order; None when the model has none."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            embedding = None
        if isinstance(embedding, nn.Embedding):
            return embedding
    for _, module in _own_modules(model):
        if isinstance(module, nn.Embedding):
            return module
    return None


def router_module(model: nn.Module, config: MolaConfig) -> nn.Module:
    """The module named by ``router_input="module:<name>"``."""
    name = config.router_input.removeprefix("module:")
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"MolaConfig.router_input={config.router_input!r}: the model has no module {name!r}.") from err


def image_channels(model: nn.Module, first_adapted: nn.Module) -> Optional[int]:
    """Input channels: ``config.num_channels`` of the root (or of a sub-model, e.g. a wrapped ViT backbone), else
    ``in_channels`` of the first Conv2d (a patch embedding or stem), adapted or not."""
    for module in model.modules():
        channels = getattr(getattr(module, "config", None), "num_channels", None)
        if isinstance(channels, int):
            return channels
    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, nn.Conv2d):
            return base.in_channels
    return first_adapted.in_channels if isinstance(first_adapted, nn.Conv2d) else None


def router_input_spec(model: nn.Module, config: MolaConfig, first_adapted: nn.Module) -> tuple[str, int]:
    """(router kind, input width), fixed when the adapter is injected so that the router exists before any optimizer
    is built and before ``from_pretrained`` loads its weights.

    ``router_input="module:<name>"``: MLP on the module's pooled features. ``router_input="input"``: the kind is
    ``config.router_kind``; ``"auto"`` picks a conv router when the model input is an image batch (the root
    ``forward``'s first parameter is ``pixel_values``/``images``/``image``, the root config has ``num_channels``, or
    the first adapted layer is a Conv2d), else an MLP. Widths come from ``router_in_features`` or are inferred (image
    channels; the ``embedding_dim`` of an input embedding that comes first in the model, else the first Linear's
    ``in_features``).
    """
    if config.router_input.startswith("module:"):
        if config.router_in_features is not None:
            return "mlp", config.router_in_features
        module = router_module(model, config)
        for sub in reversed(list(module.modules())):
            for attr in ("out_features", "out_channels", "num_features", "embedding_dim"):
                if isinstance(getattr(sub, attr, None), int):
                    return "mlp", getattr(sub, attr)
            if isinstance(sub, nn.LayerNorm):
                return "mlp", int(sub.normalized_shape[-1])
        raise ValueError(
            f"Cannot infer the feature width of router module {config.router_input!r}; set "
            "MolaConfig.router_in_features."
        )
    kind = config.router_kind
    if kind == "auto":
        params = forward_parameter_names(model, ordered=True)
        is_image = (
            (bool(params) and params[0] in IMAGE_INPUT_NAMES)
            or isinstance(getattr(getattr(model, "config", None), "num_channels", None), int)
            or isinstance(first_adapted, nn.Conv2d)
        )
        kind = "conv" if is_image else "mlp"
    if config.router_in_features is not None:
        return kind, config.router_in_features
    if kind == "conv":
        channels = image_channels(model, first_adapted)
        if channels is None:
            raise ValueError(
                "Cannot infer the image channels of the MoLA conv router (router_input='input'); set "
                "MolaConfig.router_in_features."
            )
        return kind, channels
    # the router reads the model input: the first embedding / Linear of the model in module order (usually the one
    # that reads the input), not the first *adapted* one (a later layer has another width)
    embedding = input_embedding(model)
    for _, module in _own_modules(model):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if module is embedding:
            return kind, embedding.embedding_dim
        if isinstance(base, nn.Linear):
            return kind, base.in_features
    raise ValueError(
        "Cannot infer the input width of the MoLA MLP router (router_input='input'); set "
        "MolaConfig.router_in_features, or router_kind='conv' for image inputs."
    )


def router_input_from(args: tuple, kwargs: dict) -> torch.Tensor:
    """The model input of a forward call: the first positional tensor, else a known input kwarg (``input_ids``
    included), else the first float tensor kwarg, else the first tensor kwarg. May be an integer tensor (ids)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ROUTER_INPUT_KWARGS + _ID_INPUT_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    for value in tensors:
        if value.is_floating_point():
            return value
    if tensors:
        return tensors[0]
    raise ValueError(
        "MoLA router (router_input='input') found no input tensor in the forward call; pass the input as the "
        f"first positional argument or one of {list(ROUTER_INPUT_KWARGS)}."
    )
