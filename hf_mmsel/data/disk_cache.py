"""The on-disk cache of the embedded datasets: build once, then memory-map (``datasets.load_from_disk``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from datasets import DatasetDict, load_from_disk


def load_or_build(target: Path, build: Callable[[], DatasetDict], cache: bool = True) -> DatasetDict:
    """``target`` when it holds a saved ``DatasetDict``, else ``build()``, saved to ``target`` atomically (a temporary
    folder beside it, then ``os.replace``; a concurrent builder winning the race is fine) when ``cache``."""
    if cache and (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))
    built = build()
    if not cache:
        return built
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        built.save_to_disk(str(tmp))
        os.replace(tmp, target)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target)) if (target / "dataset_dict.json").exists() else built
