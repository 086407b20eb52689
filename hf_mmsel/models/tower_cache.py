"""An embedding cache for locked towers (``ContrastiveTrainingArguments.tower_embedding_cache``). Plain torch + numpy;
no Trainer import.

**What is cached.** A tower locked as a whole (:func:`~hf_mmsel.models.locking.lock_tower` with no unlocked layers and
no LoRA: frozen and kept in eval mode for good) computes a function of the sample alone. For every ``sample_idx`` the
cache keeps what the tower hands to the projection: its ``pooler_output`` after the tower's own forward hooks (so a
sentence-transformers text tower's pooled and normalised vector, a ResNet's flattened pool; for a tower that returns
a tensor, as :class:`~hf_mmsel.models.SmallDualEncoderModel`'s do, that tensor), in the tower's compute dtype
(float32 on CPU), in a memory-mapped array sized for the whole pool::

    <output_dir>/tower_cache/<tower>/fingerprint.json                 what the rows were computed from
    <output_dir>/tower_cache/<tower>/filled.u8                        [N] uint8, 1 = row written
    <output_dir>/tower_cache/<tower>/values.<kind>.<dtype>.<D>.bin    [N, D] raw rows (a sparse file)

``<tower>`` is ``image`` / ``text`` (``network<k>-image`` ... for a ``CoTrainedDualEncoder``).

**How a forward uses it.** :class:`TowerEmbeddingCache.batch` is a context manager the trainer opens around a
forward with that forward's ``sample_idx``: inside it every cacheable tower of the model is temporarily replaced by a
:class:`CachedTower` (a ``setattr`` on its parent, undone on exit, so the model outside the context, in evaluation,
``save_model`` and checkpoints, is the plain model with its own state-dict keys). The training forward and the
no-grad scoring forward both pass through it. A :class:`CachedTower` answers a batch whose rows are all filled from
the array and writes what the real tower computes for the missing rows. Kernels may give a row other numbers in a
small batch than in a large one (oneDNN's convolutions of EfficientNet-Lite0 do below 16 rows), so missing rows are
not simply run alone: at the first batch that misses every row, the cache finds the smallest sub-batch ``s`` (1, 2,
4, ...) whose rows come out bit-identical to the whole batch's (``TowerCache.exact_batch``, per process), and a
later batch with ``m`` missing rows runs them together with ``max(m, s) - m`` of its filled rows (the tensors of the
call whose first dimension is the batch are sliced); until ``s`` is known such a batch runs whole. Outside a
``batch`` context (or for a tower kind the context leaves out, such as the image tower of a cheap
``score_image_size`` / ``score_patch_drop`` scoring forward, whose inputs differ) it runs the tower unchanged. Misses
are computed with autocast off, so the array always holds the tower's full-precision output; under autocast (GPU
``score_dtype="bfloat16"``, mixed precision) a cached scoring forward therefore sees the float32 tower output where
an uncached one would run the tower in bfloat16 (on CPU, where ``score_dtype`` is float32, cached and uncached runs
compute the same numbers).

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

**Processes, kill and resume.** Each rank only ever sees the samples it owns (the owner-stable sampler: ``sample_idx
mod W = r``; a stream's rank reads its own shards), so each rank writes only its rows of the one shared sparse file.
The main process validates / clears the folder and creates ``filled.u8`` before a barrier, the values file is
created by whichever rank first needs it (a ``link`` of a finished temporary file, so nobody ever truncates another
rank's rows), and all ranks check that they computed the same fingerprint. A row's values are written and
``msync``-ed before its ``filled`` byte is set, so a process killed at any point leaves only rows whose flag is off
or whose values are complete; ``filled`` is flushed at every checkpoint save and at the end. A resumed run (any
world size) finds the same fingerprint and reuses every filled row: the rows do not depend on the training state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .features import adapt_siglip_inputs, unwrap_model
from .locking import TOWERS, is_locked

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
FINGERPRINT_FILE = "fingerprint.json"
FILLED_FILE = "filled.u8"
FORMAT_VERSION = 1
_VALUES = re.compile(r"values\.(tensor|pooled)\.(float32|float16|bfloat16|float64)\.(\d+)\.bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")
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
def _stable_repr(obj) -> str:
    return _ADDRESS.sub("", repr(obj))


def _json_safe(value):
    return json.loads(json.dumps(value, sort_keys=True, default=_stable_repr))


def _sha256(data: bytes | str) -> str:
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
        out["serialisation"] = _sha256(backend.to_str())
    elif callable(getattr(tokenizer, "get_vocab", None)):
        out["vocab"] = _sha256(json.dumps(sorted(tokenizer.get_vocab().items())))
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
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _atomic_write_json(path: Path, payload: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _create_sparse(path: Path, size: int) -> None:
    """Create ``path`` as a zero-filled (sparse) file of ``size`` bytes unless it exists; several processes may race:
    the file appears whole (a hard link of a finished temporary file) and an existing one is never truncated."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise TypeError(f"the tower cache stores floating point rows ({list(_DTYPES)}), got {dtype}")


class TowerCache:
    """The rows of one tower (module docstring): ``[N, D]`` raw values + ``filled`` flags, memory-mapped under
    ``folder``, valid for ``fingerprint``. :meth:`prepare` (main process) validates / clears the folder,
    :meth:`attach` (every process, after it) opens the arrays; :meth:`open` does both in one process."""

    def __init__(self, folder: str | os.PathLike, num_samples: int, fingerprint: str,
                 details: Mapping[str, Any] | None = None, name: str = "tower") -> None:
        if int(num_samples) < 1:
            raise ValueError(f"a tower cache needs num_samples >= 1, got {num_samples}")
        self.folder = Path(folder)
        self.num_samples = int(num_samples)
        self.fingerprint = str(fingerprint)
        self.details = dict(details or {})
        self.name = name
        self.kind: str | None = None  # "tensor" (the tower returns a tensor) or "pooled" (pooler_output)
        #: smallest sub-batch the tower computes bit-identically to a whole batch (found at the first all-miss batch)
        self.exact_batch: int | None = None
        self.dtype: torch.dtype | None = None
        self.dim: int | None = None
        self.hits = 0
        self.misses = 0
        self.invalidated = False
        self._filled: torch.Tensor | None = None  # this process's view, [N] bool
        self._filled_map: np.memmap | None = None
        self._values: np.memmap | None = None

    # ---------------------------------------------------------------------------------------------- set-up
    def prepare(self) -> bool:
        """Main process: keep the folder if its fingerprint matches, else clear it (one-line warning naming what
        changed); create ``filled.u8``. Returns whether the cache was invalidated."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = _read_json(self.folder / FINGERPRINT_FILE)
        reason = None
        if stored is None:
            if any(p for p in self.folder.iterdir()):
                reason = "no valid fingerprint.json (an interrupted invalidation)"
        elif stored.get("fingerprint") != self.fingerprint:
            old = stored.get("details") or {}
            changed = sorted(k for k in set(old) | set(self.details) if old.get(k) != self.details.get(k))
            reason = "changed: " + (", ".join(changed) or "format")
        if reason is not None:
            logger.warning("tower embedding cache %r invalidated (%s): cleared %s, its rows are recomputed",
                           self.name, reason, self.folder)
            self._clear()
        filled = self.folder / FILLED_FILE
        _create_sparse(filled, self.num_samples)
        if filled.stat().st_size != self.num_samples:
            raise RuntimeError(f"{filled} holds {filled.stat().st_size} flags for {self.num_samples} samples; delete "
                               f"{self.folder}")
        if stored is None or reason is not None:
            _atomic_write_json(self.folder / FINGERPRINT_FILE, {"format": FORMAT_VERSION, "name": self.name,
                                                                "fingerprint": self.fingerprint,
                                                                "num_samples": self.num_samples,
                                                                "details": self.details})
        self.invalidated = reason is not None
        return self.invalidated

    def _clear(self) -> None:
        (self.folder / FINGERPRINT_FILE).unlink(missing_ok=True)  # first: a half-cleared folder is never trusted
        for path in self.folder.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def attach(self) -> None:
        """Every process: open ``filled`` and (when some rank created it already) the values file."""
        self.close()
        stored = _read_json(self.folder / FINGERPRINT_FILE)
        if stored is None or stored.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"the tower cache {self.folder} does not hold fingerprint {self.fingerprint[:12]} "
                               "(prepare() runs on the main process before attach())")
        self._filled_map = np.memmap(self.folder / FILLED_FILE, dtype=np.uint8, mode="r+", shape=(self.num_samples,))
        self._filled = torch.from_numpy(np.asarray(self._filled_map, dtype=bool).copy())
        found = [m for m in (_VALUES.fullmatch(p.name) for p in self.folder.iterdir()) if m]
        if len(found) > 1:
            raise RuntimeError(f"{self.folder} holds several values files ({[m[0] for m in found]}); delete it")
        if found:
            kind, dtype, dim = found[0].groups()
            self._open_values(kind, _DTYPES[dtype], int(dim))
        elif bool(self._filled.any()):
            raise RuntimeError(f"{self.folder}: rows are flagged filled but no values file exists; delete it")

    def open(self) -> "TowerCache":
        """:meth:`prepare` + :meth:`attach` (one process)."""
        self.prepare()
        self.attach()
        return self

    def _open_values(self, kind: str, dtype: torch.dtype, dim: int, create: bool = False) -> None:
        path = self.folder / f"values.{kind}.{_dtype_name(dtype)}.{dim}.bin"
        row_bytes = dim * torch.empty((), dtype=dtype).element_size()
        if create:
            _create_sparse(path, self.num_samples * row_bytes)
        if path.stat().st_size != self.num_samples * row_bytes:
            raise RuntimeError(f"{path} has {path.stat().st_size} bytes, expected {self.num_samples} x {row_bytes}; "
                               f"delete {self.folder}")
        self._values = np.memmap(path, dtype=np.uint8, mode="r+", shape=(self.num_samples, row_bytes))
        self.kind, self.dtype, self.dim = kind, dtype, dim

    # --------------------------------------------------------------------------------------------- rows
    @property
    def filled(self) -> torch.Tensor:
        """``[N]`` bool: the rows this process knows are filled (its own, plus those filled when it attached)."""
        if self._filled is None:
            raise RuntimeError("attach() the tower cache first")
        return self._filled

    def lookup(self, sample_idx: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: which of ``sample_idx`` (CPU long) are filled."""
        return self.filled[sample_idx]

    def read(self, sample_idx: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``sample_idx`` (all filled), ``[n, D]`` in the cache dtype, on CPU."""
        rows = np.ascontiguousarray(self._values[sample_idx.numpy()])
        return torch.from_numpy(rows).view(self.dtype)

    def write(self, sample_idx: torch.Tensor, values: torch.Tensor, kind: str) -> torch.Tensor:
        """Store ``values`` ``[n, D]`` for ``sample_idx``: the rows first (``msync``-ed), then their ``filled``
        flags. Returns the values as stored (the cache dtype), on their device."""
        values = values.detach()
        if values.dim() != 2:
            raise ValueError(f"the tower cache stores [batch, D] outputs; the {self.name} tower returned "
                             f"{tuple(values.shape)}: set tower_embedding_cache='off'")
        if self._values is None:
            self._open_values(kind, values.dtype, int(values.shape[1]), create=True)
        if kind != self.kind or int(values.shape[1]) != self.dim:
            raise RuntimeError(f"the {self.name} tower returned {kind} rows of width {values.shape[1]}, the cache "
                               f"holds {self.kind} rows of width {self.dim}")
        stored = values.to(self.dtype)
        rows = sample_idx.numpy()
        self._values[rows] = stored.to("cpu").contiguous().view(torch.uint8).numpy()
        self._values.flush()  # the values are on disk before any flag says so
        self._filled_map[rows] = 1
        self._filled[sample_idx] = True
        self.misses += int(sample_idx.numel())
        return stored

    def flush(self) -> None:
        """Write the ``filled`` flags (and values) to disk (called at checkpoint saves and at the end)."""
        if self._values is not None:
            self._values.flush()
        if self._filled_map is not None:
            self._filled_map.flush()

    def close(self) -> None:
        self.flush()
        self._values = self._filled_map = None
        self._filled = None

    def stats(self) -> dict[str, int]:
        filled = int(self._filled.sum()) if self._filled is not None else 0
        return {"hits": self.hits, "misses": self.misses, "filled": filled, "num_samples": self.num_samples,
                "exact_batch": self.exact_batch}


# ------------------------------------------------------------------------------------------------ the forward
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
        fingerprint = _sha256(json.dumps(details, sort_keys=True))
        cache = TowerCache(Path(output_dir) / TOWER_CACHE_DIR / name, num_samples, fingerprint, details, name)
        slots.append(_Slot(network, attr, kind, tower, cache))
    digest = _sha256("".join(slot.cache.fingerprint for slot in slots))
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
