"""What the rows of a tower embedding cache were computed from (:mod:`~hf_mmsel.models.tower_cache`). Plain torch.

**Fingerprint.** sha256 of: the tower class and config, a hash of every tensor of its state dict (weights and
buffers: names, dtypes, shapes, bytes), the forward hooks on it and the pooling settings of its parent
(``text_pooling`` / ``text_normalize``), the preprocessing of its side read from the collator (image transform
size / mean / std / resample / crop or the image processor's settings; tokenizer (its full serialisation or vocab),
``max_length``, padding), the data (``datasets.Dataset._fingerprint`` of a map-style set, the shard manifest's
fingerprint of a stream) and ``N``. A stored fingerprint that differs clears the folder with a one-line warning
naming what changed; rows are never reused across a change. Data without a fingerprint (a plain torch dataset) is
not cached (a notice says so). Preprocessing must be deterministic: a collator, image transform or image processor
that declares ``augments = True`` (or ``deterministic = False``) is refused; the repository's collators are
deterministic (``ImageTextCollator`` with ``ImageTransform`` / an HF image processor / cached ``pixel_values``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["data_fingerprint", "preprocessing_description", "sha256_hex", "tower_fingerprint"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


def _stable_repr(obj) -> str:
    return _ADDRESS.sub("", repr(obj))


def _json_safe(value):
    return json.loads(json.dumps(value, sort_keys=True, default=_stable_repr))


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def _config_description(module: nn.Module):
    config = getattr(module, "config", None)
    if config is not None and callable(getattr(config, "to_dict", None)):
        d = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
        return _json_safe(d)
    return _stable_repr(module)  # the module tree


def _hook_names(module: nn.Module) -> list[str]:
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return [f"{getattr(h, '__module__', '')}.{getattr(h, '__qualname__', type(h).__qualname__)}" for h in hooks]


def tower_fingerprint(tower: nn.Module, parent: nn.Module | None = None) -> dict[str, Any]:
    """What the tower's output depends on besides its input: class, config, a hash of its state dict, its forward
    hooks and its parent's pooling settings (``text_pooling`` / ``text_normalize``)."""
    parent_config = getattr(parent, "config", None)
    pooling = {k: getattr(parent_config, k, None) for k in ("text_pooling", "text_normalize")}
    return {"class": f"{type(tower).__module__}.{type(tower).__qualname__}", "config": _config_description(tower),
            "weights": _hash_tensors(tower.state_dict().items()), "hooks": _hook_names(tower),
            "pooling": _json_safe(pooling)}


def _describe_tokenizer(tokenizer) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    out = {"class": type(tokenizer).__qualname__}
    for key in ("model_max_length", "padding_side", "truncation_side", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        out[key] = value if isinstance(value, (int, str, float, type(None))) else _stable_repr(value)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        out["serialisation"] = sha256_hex(backend.to_str())
    elif callable(getattr(tokenizer, "get_vocab", None)):
        out["vocab"] = sha256_hex(json.dumps(sorted(tokenizer.get_vocab().items())))
        out["init_kwargs"] = _stable_repr(sorted((getattr(tokenizer, "init_kwargs", None) or {}).items()))
    else:
        out["repr"] = _stable_repr(tokenizer)
    return out


def _describe(obj) -> Any:
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe({"class": type(obj).__qualname__, **dataclasses.asdict(obj)})
    if callable(getattr(obj, "to_dict", None)):  # an HF image processor
        return _json_safe({"class": type(obj).__qualname__, **obj.to_dict()})
    return _stable_repr(obj)


def preprocessing_description(collator, kind: str) -> dict[str, Any]:
    """The preprocessing of one side (``"image"`` / ``"text"``) as the collator does it: the image transform or
    image processor settings, or the tokenizer, ``max_length`` and padding. A collator class other than the
    repository's ``ImageTextCollator`` also contributes its attributes' repr (memory addresses removed)."""
    if collator is None:
        return {"collator": None}
    out: dict[str, Any] = {"collator": f"{type(collator).__module__}.{type(collator).__qualname__}"}
    if kind == "image":
        out["image_transform"] = _describe(getattr(collator, "image_transform", None))
        out["image_processor"] = _describe(getattr(collator, "image_processor", None))
    else:
        out["tokenizer"] = _describe_tokenizer(getattr(collator, "tokenizer", None))
        out["max_length"] = getattr(collator, "max_length", None)
        out["padding"] = _stable_repr(getattr(collator, "padding", None))
    if type(collator).__name__ != "ImageTextCollator" or type(collator).__module__ != "hf_mmsel.data.collator":
        skip = {"tokenizer", "image_transform", "image_processor"}
        attrs = sorted(vars(collator).items()) if hasattr(collator, "__dict__") else []
        state = {k: v for k, v in attrs if k not in skip}
        out["state"] = _stable_repr(state)
    return out


def data_fingerprint(dataset) -> str | None:
    """A cheap fingerprint of the training data: the shard manifest's of a stream, ``datasets``' ``_fingerprint``
    of a map-style ``Dataset``; ``None`` when the data has none."""
    manifest = getattr(dataset, "manifest", None)
    fingerprint = getattr(manifest, "fingerprint", None) if manifest is not None else None
    if isinstance(fingerprint, str) and fingerprint:
        return f"manifest:{fingerprint}"
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint:
        return f"datasets:{fingerprint}"
    return None


# ------------------------------------------------------------------------------------------------ storage
