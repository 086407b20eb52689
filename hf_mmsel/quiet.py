"""Quiet runs: the third-party notices that say nothing to an ``hf-mmsel`` user are dropped at start-up.

Each entry of :data:`KNOWN_NOTICES` names one library message by its logger (or warning category) and a precise
regular expression, with the reason it does not concern the user; nothing else is touched, so a warning that does
concern the user (a deprecated flag, a bad setting, an import that failed) still shows. ``HF_MMSEL_VERBOSE=1`` or
``--debug`` shows everything. The filters are installed before the libraries are imported (a logger's filters
survive the library's own logging set-up), so this costs no import.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import warnings
from typing import NamedTuple

__all__ = ["KNOWN_NOTICES", "Notice", "quiet_third_party", "verbose_requested"]


class Notice(NamedTuple):
    """One known, harmless library message: ``logger`` (a logging logger name) or ``category`` (a warning class
    name, for ``warnings.warn``), the ``pattern`` its text starts with, and ``why`` it is dropped."""

    pattern: str
    why: str
    logger: str | None = None
    category: str | None = None


KNOWN_NOTICES: tuple[Notice, ...] = (
    Notice(r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it",
           "DeepSpeed's accelerator probe, printed by every process that imports deepspeed on a machine without a "
           "GPU (the recipes pick the device themselves)", logger="DeepSpeed"),
    Notice(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
           "transformers' PIL image-processor backend is the one this package uses and tests on CPU torch (PyPI's "
           "torchvision does not match a CPU torch)", logger="transformers.utils.import_utils"),
    Notice(r"`is_gradient_checkpointing` is deprecated",
           "peft's get_peft_model reads transformers' old attribute name: a note between the two libraries",
           category="FutureWarning"),
)


def verbose_requested(argv: list[str] | tuple[str, ...] = ()) -> bool:
    """``--debug`` among ``argv`` or ``HF_MMSEL_VERBOSE`` set to a true value."""
    return "--debug" in argv or os.environ.get("HF_MMSEL_VERBOSE", "").lower() in ("1", "true", "yes", "on")


class _DropKnown(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.regex.match(record.getMessage()) is None
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True


_installed = False


def quiet_third_party(*, verbose: bool = False) -> bool:
    """Drop the :data:`KNOWN_NOTICES` for the rest of the process (idempotent); ``verbose`` (or
    ``HF_MMSEL_VERBOSE=1``) keeps every message. Returns whether the filters are on."""
    global _installed
    if verbose or verbose_requested():
        return False
    if _installed:
        return True
    by_logger: dict[str, list[str]] = {}
    for notice in KNOWN_NOTICES:
        if notice.logger is not None:
            by_logger.setdefault(notice.logger, []).append(notice.pattern)
        else:
            warnings.filterwarnings("ignore", message=notice.pattern, category=getattr(builtins, notice.category))
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnown(patterns))
    _installed = True
    return True
