"""What every recipe does around its work: guard the output folder, and print an end-of-run summary.

One contract for all recipes (``train-clip``, ``train-mola``, ``curate``, the benchmarks):
- ``prepare_output_dir`` refuses a non-empty output folder unless ``--overwrite_output_dir`` (then the recipe
  replaces only the files it writes, never deletes anything else) or ``--resume_from_checkpoint`` is given.
- ``print_run_summary`` prints one table at the end of a run: measured metrics, where the artefacts went, and
  how to load them. Only the main process prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

__all__ = ["OutputDirExistsError", "prepare_output_dir", "format_run_summary", "print_run_summary", "check_push_settings",
           "hub_ids_only", "parse_bool"]


def parse_bool(text: str) -> bool:
    """``type=`` of an argparse flag taking true/false (1/0, yes/no, y/n), as HfArgumentParser's bool flags do."""
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OutputDirExistsError(FileExistsError):
    """The output folder already holds results and the user did not ask to overwrite or resume them."""


def prepare_output_dir(output_dir: str | Path, *, overwrite_output_dir: bool = False,
                       resume_from_checkpoint: Any = None) -> Path:
    """Create ``output_dir`` or check that writing into it is allowed; return it as a ``Path``.

    A missing or empty folder is always fine. A non-empty one needs ``overwrite_output_dir=True`` (the recipe then
    overwrites only its own files) or a ``resume_from_checkpoint`` (the run continues what is there).
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite_output_dir and not resume_from_checkpoint:
        shown = sorted(p.name for p in path.iterdir())[:5]
        raise OutputDirExistsError(
            f"output_dir {str(path)!r} is not empty (holds {shown}{' ...' if len(shown) == 5 else ''}). Pass "
            f"--overwrite_output_dir true to replace the files this run writes (nothing else is deleted), "
            f"--resume_from_checkpoint to continue it, or choose another --output_dir.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_run_summary(title: str, metrics: Mapping[str, Any] | None = None,
                       artefacts: Mapping[str, Any] | None = None, load_hint: str | None = None) -> str:
    """The end-of-run summary as text: a title, a ``name | value`` table of metrics, the artefact paths and a
    snippet that loads the result."""
    lines = [f"***** {title} *****"]
    rows = [(k, _format_value(v)) for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))]
    if rows:
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}} = {v}" for k, v in rows]
    if artefacts:
        lines.append("  outputs:")
        width = max(len(k) for k in artefacts)
        lines += [f"    {k:<{width}}  {v}" for k, v in artefacts.items()]
    if load_hint:
        lines.append("  load it with:")
        lines += [f"    {line}" for line in load_hint.strip().splitlines()]
    return "\n".join(lines)


def print_run_summary(title: str, metrics: Mapping[str, Any] | None = None,
                      artefacts: Mapping[str, Any] | None = None, load_hint: str | None = None,
                      *, is_main_process: bool = True) -> str:
    """Print ``format_run_summary(...)`` on the main process (and return the text)."""
    text = format_run_summary(title, metrics, artefacts, load_hint)
    if is_main_process:
        print(text, flush=True)
    return text


def check_push_settings(hub_model_id: str | None, hub_token: str | None = None, *,
                        flag: str = "--hub_model_id") -> str:
    """The Hub token for ``--push_to_hub``, checked before any work so nothing is lost: every recipe needs the repo
    id spelled out (``namespace/name``), none guesses it from the folder name."""
    if not hub_model_id:
        raise ValueError(f"--push_to_hub needs {flag} <namespace/name> (the Hub repository to create or update)")
    from hf_mmsel.hub import resolve_hub_token

    return resolve_hub_token(hub_token, repo_id=hub_model_id)


def hub_ids_only(*names: str | None) -> list[str]:
    """The names that look like Hub repo ids (not local folders): what a card's ``base_model`` / ``datasets``
    metadata may list (the Hub rejects other values)."""
    import os

    return [n for n in names if n and not os.path.exists(n) and not os.path.isabs(n) and n.count("/") <= 1]
