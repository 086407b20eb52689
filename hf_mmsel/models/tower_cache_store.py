"""The on-disk store of one cached tower (:class:`TowerCache`): a memory-mapped ``[N, D]`` sparse values file, a
``filled`` flag per sample and the fingerprint the rows were computed from (:mod:`~hf_mmsel.models.tower_cache`).
Plain torch + numpy."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FILLED_FILE", "FINGERPRINT_FILE", "FORMAT_VERSION", "TowerCache"]

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
FILLED_FILE = "filled.u8"
FORMAT_VERSION = 1
_VALUES = re.compile(r"values\.(tensor|pooled)\.(float32|float16|bfloat16|float64)\.(\d+)\.bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
