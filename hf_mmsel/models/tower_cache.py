"""An embedding cache for locked towers (``ContrastiveTrainingArguments.tower_embedding_cache``). Plain torch + numpy;
no Trainer import. Design, invalidation and measurements: docs/towers.md, "Embedding cache for locked towers".

A tower locked as a whole (:func:`~hf_mmsel.models.locking.lock_tower`: no unlocked layers, no LoRA) computes a
function of the sample alone, so for every ``sample_idx`` the cache keeps what the tower hands to the projection (its
``pooler_output`` after its own forward hooks, or the tensor it returns), in its compute dtype, in a memory-mapped
array sized for the whole pool::

    <output_dir>/tower_cache/<tower>/fingerprint.json                 what the rows were computed from
    <output_dir>/tower_cache/<tower>/filled.u8                        [N] uint8, 1 = row written
    <output_dir>/tower_cache/<tower>/values.<kind>.<dtype>.<D>.bin    [N, D] raw rows (a sparse file)

``<tower>`` is ``image`` / ``text`` (``network<k>-image`` ... for a ``CoTrainedDualEncoder``).
:meth:`TowerEmbeddingCache.batch` swaps every cacheable tower for a :class:`CachedTower` (``setattr`` on its parent,
undone on exit) around a forward with that forward's ``sample_idx``; filled rows come from the array, missing ones
are computed (autocast off) and written. Kernels may compute a row differently in a small batch, so missing rows run
together with filled ones up to the smallest sub-batch that reproduces a whole batch bit for bit
(:meth:`CachedTower._exact_batch`). The fingerprint (:mod:`~hf_mmsel.models.tower_fingerprint`: tower weights,
preprocessing, data, ``N``) guards reuse: a mismatch clears the folder with a one-line warning.

Each rank writes only the rows it owns (owner-stable sampling) into the one shared sparse file; a row's values are
``msync``-ed before its ``filled`` byte, ``filled`` is flushed at every checkpoint save, and a resumed run (any world
size) reuses every filled row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .features import adapt_siglip_inputs, unwrap_model
from .locking import TOWERS, is_locked
from .tower_cache_store import FORMAT_VERSION, TowerCache
from .tower_fingerprint import data_fingerprint, preprocessing_description, sha256_hex, tower_fingerprint

__all__ = [
    "CachedTower",
    "TOWER_CACHE_DIR",
    "TOWER_CACHE_MODES",
    "TowerCache",
    "TowerEmbeddingCache",
    "backend_problem",
    "build_tower_cache",
    "cache_scope",
    "data_fingerprint",
    "preprocessing_description",
    "preprocessing_problem",
    "resolve_cache_mode",
    "tower_cache_problem",
    "tower_fingerprint",
]

logger = logging.getLogger(__name__)

#: sub-folder of ``output_dir`` holding one folder per cached tower
TOWER_CACHE_DIR = "tower_cache"
#: ``tower_embedding_cache`` values: ``auto`` caches every fully locked tower (a notice when it cannot), ``on`` the
#: same but raises when nothing can be cached, ``off`` never caches
TOWER_CACHE_MODES = ("auto", "on", "off")
_BATCH_KEYS = ("pixel_values", "input_ids", "inputs_embeds")


def resolve_cache_mode(value) -> str:
    """``tower_embedding_cache`` as one of :data:`TOWER_CACHE_MODES` (``True`` / ``"true"`` -> ``on``, ``False`` /
    ``"false"`` -> ``off``); raises ``ValueError`` for anything else."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    aliases = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off", "none": "off"}
    text = aliases.get(text, text)
    if text not in TOWER_CACHE_MODES:
        raise ValueError(f"tower_embedding_cache must be one of {list(TOWER_CACHE_MODES)} (or a bool), got {value!r}")
    return text


# ------------------------------------------------------------------------------------------------ eligibility
def tower_cache_problem(tower: nn.Module) -> str | None:
    """Why the outputs of ``tower`` cannot be cached, or ``None`` when they can: it must be locked as a whole
    (``lock_tower`` with ``unlocked_layers=0``: kept in eval mode), with no trainable parameter and no LoRA."""
    if any(hasattr(m, "lora_A") for m in tower.modules()):
        return "it carries LoRA adapters (tower_lora_r): its output changes as they train"
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    if trainable:
        return (f"{len(trainable)} of its parameter tensors train ({trainable[0]}, ...): only a wholly locked tower "
                "(no *_unlocked_layers) is cached")
    if not is_locked(tower):
        return ("it is frozen but not locked as a whole (lock_*_tower without *_unlocked_layers keeps it in eval "
                "mode); its dropout / BatchNorm could follow train()")
    return None


def preprocessing_problem(collator) -> str | None:
    """Why the inputs the collator makes for a sample could change between visits (random augmentation), or
    ``None``: the collator, its ``image_transform`` or ``image_processor`` declaring ``augments = True`` or
    ``deterministic = False`` is refused."""
    for obj, what in ((collator, "data collator"), (getattr(collator, "image_transform", None), "image transform"),
                      (getattr(collator, "image_processor", None), "image processor")):
        if obj is None:
            continue
        if getattr(obj, "augments", False) is True or getattr(obj, "deterministic", True) is False:
            return (f"the {what} ({type(obj).__name__}) augments its inputs at random: a sample's tower output "
                    "would change between visits")
    return None


def backend_problem(args) -> str | None:
    """Why the training backend of ``args`` (``TrainingArguments``) cannot use the cache, or ``None``: the towers
    are swapped per forward, which torch.compile graphs, FSDP / DeepSpeed parameter sharding and DataParallel
    replicas do not see (one process and DDP are supported)."""
    if getattr(args, "torch_compile", False):
        return "torch_compile would trace the towers once; the cache swaps them per forward"
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed is not supported yet (one process and DDP are)"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP is not supported yet (one process and DDP are)"
    if int(getattr(args, "n_gpu", 1) or 1) > 1:
        return "DataParallel (several GPUs in one process) is not supported; use DDP"
    return None


# ------------------------------------------------------------------------------------------------ fingerprints
def _take_rows(args: Sequence, kwargs: Mapping, rows: torch.Tensor, n: int) -> tuple[tuple, dict]:
    def take(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and int(v.shape[0]) == n:
            return v.index_select(0, rows.to(v.device))
        return v

    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def _tensors(args: Sequence, kwargs: Mapping) -> Iterator[torch.Tensor]:
    for key in _BATCH_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            yield kwargs[key]
    yield from (a for a in args if isinstance(a, torch.Tensor))
    yield from (v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _batch_rows(args: Sequence, kwargs: Mapping) -> tuple[int, torch.device]:
    for t in _tensors(args, kwargs):
        if t.dim() >= 1:
            return int(t.shape[0]), t.device
    raise ValueError("a cached tower needs a batched tensor input (pixel_values / input_ids)")


def _no_autocast(device: torch.device):
    try:
        on = torch.is_autocast_enabled(device.type)
    except TypeError:  # pragma: no cover - old torch
        on = torch.is_autocast_enabled()
    return torch.autocast(device_type=device.type, enabled=False) if on else contextlib.nullcontext()


def _pooled(output) -> tuple[str, torch.Tensor]:
    """``(kind, what feeds the projection)`` of a tower's output."""
    if isinstance(output, torch.Tensor):
        return "tensor", output
    if isinstance(output, (tuple, list)):
        pooled = output[1] if len(output) > 1 else None
    else:
        pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"the tower returned {type(output).__name__} without a pooler_output tensor: it cannot be "
                        "cached (set tower_embedding_cache='off')")
    return "pooled", pooled


def _package(kind: str, pooled: torch.Tensor, kwargs: Mapping):
    """A tower output holding ``pooled``: the tensor itself, or ``BaseModelOutputWithPooling`` (a tuple with
    ``return_dict=False``) whose ``last_hidden_state`` is an empty ``[n, 0, D]`` placeholder: index 1 and
    ``pooler_output`` are the cached rows, as the dual encoders read them."""
    if kind == "tensor":
        return pooled
    hidden = pooled.new_zeros((pooled.shape[0], 0, pooled.shape[-1]))
    if kwargs.get("return_dict") is False:
        return hidden, pooled
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class CachedTower(nn.Module):
    """A locked tower behind its :class:`TowerCache`, put in place by :meth:`TowerEmbeddingCache.batch` only for
    the duration of a forward (module docstring). Attributes it lacks (``config``, flags set on the tower) are read
    from the tower."""

    def __init__(self, tower: nn.Module, cache: TowerCache, owner: "TowerEmbeddingCache", kind: str) -> None:
        super().__init__()
        self.tower = tower
        self._cache = cache
        self._owner = owner
        self._kind = kind

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            tower = (self.__dict__.get("_modules") or {}).get("tower")
            if tower is None:  # half-built (copy / unpickling)
                raise
            return getattr(tower, name)

    def forward(self, *args, **kwargs):
        sample_idx = self._owner.current(self._kind)
        if sample_idx is None:
            return self.tower(*args, **kwargs)
        cache = self._cache
        n, device = _batch_rows(args, kwargs)
        if n != int(sample_idx.numel()):
            raise RuntimeError(f"the {cache.name} tower got a batch of {n} rows inside a cache context for "
                               f"{sample_idx.numel()} sample_idx")
        hits = cache.lookup(sample_idx)
        if bool(hits.all()):
            cache.hits += n
            return _package(cache.kind, cache.read(sample_idx).to(device, non_blocking=True), kwargs)
        missing = torch.nonzero(~hits).flatten()
        m = int(missing.numel())
        exact = cache.exact_batch
        if m == n or exact is None or max(m, exact) >= n:  # the whole batch, as without the cache
            with _no_autocast(device):
                output = self.tower(*args, **kwargs)
            kind, fresh = _pooled(output)
            if m == n and exact is None:
                cache.exact_batch = self._exact_batch(args, kwargs, fresh, n)
            stored = cache.write(sample_idx[missing], fresh.index_select(0, missing.to(fresh.device)), kind)
            if stored.dtype != fresh.dtype:  # the rows later hits return, in the cache dtype
                return _package(kind, fresh.to(stored.dtype), kwargs)
            return output
        # the missing rows + enough filled ones for a sub-batch that computes them as the whole batch does
        filled = torch.nonzero(hits).flatten()
        rows = torch.cat([missing, filled[: max(m, exact) - m]])
        sub_args, sub_kwargs = _take_rows(args, kwargs, rows, n)
        with _no_autocast(device):
            kind, fresh = _pooled(self.tower(*sub_args, **sub_kwargs))
        stored = cache.write(sample_idx[missing], fresh[:m], kind)
        out = torch.empty((n, stored.shape[1]), dtype=stored.dtype, device=stored.device)
        out[filled.to(out.device)] = cache.read(sample_idx[filled]).to(out.device)
        out[missing.to(out.device)] = stored
        cache.hits += n - m
        return _package(kind, out, kwargs)

    def _exact_batch(self, args: Sequence, kwargs: Mapping, full: torch.Tensor, n: int) -> int:
        """The smallest sub-batch size (1, 2, 4, ... below ``n``) whose rows the tower computes bit-identically to
        the whole batch of ``n`` (``full``: its output), else ``n``."""
        size = 1
        while size < n:
            sub_args, sub_kwargs = _take_rows(args, kwargs, torch.arange(size), n)
            with _no_autocast(full.device):
                _, part = _pooled(self.tower(*sub_args, **sub_kwargs))
            if torch.equal(part, full[:size]):
                return size
            size *= 2
        return n


# ------------------------------------------------------------------------------------------------ the manager
@dataclasses.dataclass
class _Slot:
    owner: nn.Module  # the dual encoder holding the tower
    attr: str  # "vision_model" / "text_model"
    kind: str  # "image" / "text"
    tower: nn.Module
    cache: TowerCache
    wrapper: CachedTower | None = None


class TowerEmbeddingCache:
    """The cacheable towers of one model and their :class:`TowerCache` (built by :func:`build_tower_cache`).

    ``with cache.batch(sample_idx): ...`` runs a forward of the model with the cached towers (module docstring);
    contexts nest (the innermost ``sample_idx`` applies). :meth:`flush` at checkpoint saves; :meth:`stats` counts
    hits and misses per tower."""

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self.slots = list(slots)
        for slot in self.slots:
            slot.wrapper = CachedTower(slot.tower, slot.cache, self, slot.kind)
        self._stack: list[tuple[torch.Tensor, frozenset]] = []

    @property
    def names(self) -> list[str]:
        return [slot.cache.name for slot in self.slots]

    @property
    def caches(self) -> dict[str, TowerCache]:
        return {slot.cache.name: slot.cache for slot in self.slots}

    def current(self, kind: str) -> torch.Tensor | None:
        """The ``sample_idx`` of the innermost context when it covers ``kind``, else ``None``."""
        if not self._stack:
            return None
        sample_idx, kinds = self._stack[-1]
        return sample_idx if kind in kinds else None

    @contextlib.contextmanager
    def batch(self, sample_idx, kinds: Iterable[str] = ("image", "text")):
        """Inside: forwards of the model read / fill the cache of the towers of ``kinds`` for the rows
        ``sample_idx`` (the batch's, in row order); other towers run as usual."""
        idx = torch.as_tensor(sample_idx).detach().to("cpu", torch.long).reshape(-1)
        outermost = not self._stack
        if outermost:
            for slot in self.slots:
                setattr(slot.owner, slot.attr, slot.wrapper)
        self._stack.append((idx, frozenset(kinds)))
        try:
            yield self
        finally:
            self._stack.pop()
            if outermost:
                for slot in self.slots:
                    setattr(slot.owner, slot.attr, slot.tower)

    def flush(self) -> None:
        for slot in self.slots:
            slot.cache.flush()

    def close(self) -> None:
        for slot in self.slots:
            slot.cache.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {slot.cache.name: slot.cache.stats() for slot in self.slots}

    def describe(self) -> str:
        parts = []
        for name, s in self.stats().items():
            total = s["hits"] + s["misses"]
            rate = f"{100.0 * s['hits'] / total:.1f} % hits" if total else "no lookups yet"
            parts.append(f"{name}: {s['filled']}/{s['num_samples']} rows filled, {rate}")
        return "; ".join(parts)


def cache_scope(cache: TowerEmbeddingCache | None, sample_idx, kinds: Iterable[str] = ("image", "text")):
    """``cache.batch(sample_idx, kinds)``, or a no-op context when ``cache`` is ``None``."""
    return contextlib.nullcontext() if cache is None else cache.batch(sample_idx, kinds)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _same_everywhere(digest: str, device) -> bool:
    dist = _dist()
    if dist is None:
        return True
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(bool((t == mine).all()) for t in every)


def build_tower_cache(model, *, mode: str = "auto", output_dir: str | os.PathLike, num_samples: int, dataset=None,
                      collator=None, device=None, is_main: bool = True,
                      unsupported: str | None = None) -> TowerEmbeddingCache | None:
    """The :class:`TowerEmbeddingCache` of ``model``'s fully locked towers (each network of a
    ``CoTrainedDualEncoder``), or ``None``: ``mode="off"``, no tower fully locked, ``unsupported`` (a backend
    reason, :func:`backend_problem`), augmenting preprocessing or data without a fingerprint. ``mode="auto"``
    logs a one-line notice for a locked tower it cannot cache; ``mode="on"`` raises instead. Call it on every
    process (it all-gathers the fingerprints and holds a barrier); ``is_main``: the process that validates and
    clears the folders under ``<output_dir>/tower_cache``."""
    mode = resolve_cache_mode(mode)
    if mode == "off":
        return None
    inner = unwrap_model(model)
    adapt_siglip_inputs(inner)  # the towers' own hooks go on the towers, never on the wrappers
    networks = list(getattr(inner, "networks", None) or [inner])
    candidates: list[tuple[nn.Module, str, str, nn.Module, str]] = []
    skipped: list[str] = []
    for k, network in enumerate(networks):
        for kind, attr in TOWERS.items():
            tower = getattr(network, attr, None)
            if isinstance(tower, CachedTower):
                tower = tower.tower
            if not isinstance(tower, nn.Module):
                continue
            name = kind if len(networks) == 1 else f"network{k}-{kind}"
            problem = tower_cache_problem(tower)
            if problem is None:
                candidates.append((network, attr, kind, tower, name))
            elif any(is_locked(m) for m in tower.modules()) or not any(p.requires_grad for p in tower.parameters()):
                skipped.append(f"the {name} tower is not cached: {problem}")

    def refuse(reason: str) -> None:
        if mode == "on":
            raise ValueError(f"tower_embedding_cache='on' cannot cache: {reason}")
        logger.info("tower embedding cache off: %s", reason)
        return None

    if not candidates:
        if skipped or mode == "on":
            return refuse("; ".join(skipped) or "no tower is locked as a whole (lock_image_tower / lock_text_tower)")
        return None
    for line in skipped:
        logger.info(line)
    for reason in (unsupported, preprocessing_problem(collator)):
        if reason:
            return refuse(reason)
    data = data_fingerprint(dataset)
    if data is None:
        return refuse(f"the training data ({type(dataset).__name__}) has no fingerprint (a datasets.Dataset or a "
                      "shard stream has one), so a change of the data could not be detected")
    if int(num_samples) < 1:
        return refuse("the training set is empty")
    slots = []
    for network, attr, kind, tower, name in candidates:
        details = {"format": FORMAT_VERSION, "tower": tower_fingerprint(tower, network),
                   "preprocessing": preprocessing_description(collator, kind), "data": data,
                   "num_samples": int(num_samples)}
        details = {"weights": details["tower"].pop("weights"), "config": details["tower"].pop("config"), **details}
        fingerprint = sha256_hex(json.dumps(details, sort_keys=True))
        cache = TowerCache(Path(output_dir) / TOWER_CACHE_DIR / name, num_samples, fingerprint, details, name)
        slots.append(_Slot(network, attr, kind, tower, cache))
    digest = sha256_hex("".join(slot.cache.fingerprint for slot in slots))
    if not _same_everywhere(digest, device if device is not None else "cpu"):
        return refuse("the processes computed different fingerprints (different weights, preprocessing or data "
                      "per rank)")
    if is_main:
        for slot in slots:
            slot.cache.prepare()
    dist = _dist()
    if dist is not None:
        dist.barrier()
    for slot in slots:
        slot.cache.attach()
    cache = TowerEmbeddingCache(slots)
    logger.info("tower embedding cache on (%s) under %s: %s", ", ".join(cache.names),
                Path(output_dir) / TOWER_CACHE_DIR, cache.describe())
    return cache


def cached_call(cache: TowerEmbeddingCache | None, sample_idx, fn: Callable[[], Any],
                kinds: Iterable[str] = ("image", "text")):
    """``fn()`` inside :func:`cache_scope` (the trainer's scoring forward, called lazily by the hooks)."""
    with cache_scope(cache, sample_idx, kinds):
        return fn()
