"""What every recipe does around its work: check its inputs early, guard the output folder, print a summary.

One contract for all recipes (``train-clip``, ``train-mola``, ``curate``, the benchmarks):
- ``prepare_output_dir`` refuses a non-empty output folder unless ``--overwrite_output_dir`` (then the recipe
  replaces only the files it writes, never deletes anything else) or ``--resume_from_checkpoint`` is given.
- ``check_source`` / ``check_output_dir`` run before heavy imports and data loading: a path that looks local
  (``./x``, ``/x``, ``x/``, ``a/b`` whose parent exists) is never sent to the Hub; a missing one is a ``UsageError``,
  and so is a Hub id when the Hub does not answer one short probe (``hub_reachable``) or ``HF_HUB_OFFLINE`` is set.
- ``configure_cpu_threads`` gives a CPU run a sane number of torch intra-op threads (``--threads``).
- ``print_run_summary`` prints one table at the end of a run: measured metrics, where the artefacts went, and
  how to load them. Only the main process prints.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
from dataclasses import field
from pathlib import Path
from typing import Any, Mapping

from hf_mmsel.errors import UsageError

__all__ = ["UsageError", "OutputDirExistsError", "check_imagefolder_columns", "check_output_dir", "check_source",
           "configure_cpu_threads",
           "default_cpu_threads", "hub_reachable", "looks_local",
           "prepare_output_dir", "format_run_summary", "print_run_summary", "check_push_settings",
           "hub_ids_only", "parse_bool"]


def image_column_field():
    """``--image_column`` of the recipes that read an image-text ``--dataset``."""
    return field(default="image", metadata={"help": "Column of --dataset with the images (an imagefolder names it "
                                                    "'image'); renamed to 'image'."})


def caption_column_field():
    """``--caption_column`` of the recipes that read an image-text ``--dataset``."""
    return field(default="caption", metadata={"help": "Column of --dataset with the captions (an imagefolder's "
                                                      "metadata.csv names it, e.g. --caption_column text)."})


def label_column_field():
    """``--label_column`` of the recipes that report zero-shot accuracy."""
    return field(default=None, metadata={"help": "Optional class-label column of --dataset (zero-shot accuracy; "
                                                 "strings are class-encoded)."})


def parse_bool(text: str) -> bool:
    """``type=`` of an argparse flag taking true/false (1/0, yes/no, y/n), as HfArgumentParser's bool flags do."""
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OutputDirExistsError(FileExistsError, UsageError):
    """The output folder already holds results and the user did not ask to overwrite or resume them."""


#: the datasets that ship with the package (no download); the same names as
#: ``hf_mmsel.data.EMBEDDED_IMAGE_TEXT_DATASETS``, repeated here so that checking flags imports no data code (tested)
EMBEDDED_DATASETS = ("easy-vqa", "digits", "emoji")
#: names that ``load_image_text_dataset`` / ``datasets.load_dataset`` resolve without a folder or the Hub
BUILTIN_DATASETS = frozenset({*EMBEDDED_DATASETS, "imagefolder", "parquet", "webdataset", "csv", "json", "arrow",
                              "text"})
_GLOB_CHARS = "*?["


def looks_local(value: str) -> bool:
    """Whether ``value`` can only mean a local path (never a Hub id): ``./x``, ``../x``, ``/x``, ``~/x``, ``x/``,
    a Windows drive, or ``a/b...`` whose parent folder exists."""
    text = str(value)
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", "..") or text.endswith(("/", "\\")):
        return True
    if len(text) > 1 and text[1] == ":":  # C:\\data
        return True
    parent = os.path.dirname(text)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def check_source(flag: str, value: str | None, *, what: str = "folder", builtin: frozenset[str] = frozenset()) -> None:
    """Refuse (``UsageError``) a ``--flag`` value that names a local path which does not exist, before anything
    is loaded; a glob must match a file. A name that is neither local, ``builtin`` nor in the Hub cache could only
    come from the Hub: it is refused too with ``HF_HUB_OFFLINE=1`` or when the Hub does not answer
    :func:`hub_reachable`'s probe (instead of the Hub client's retries)."""
    if not value or value in builtin:
        return
    text = os.path.expanduser(str(value))
    if any(c in text for c in _GLOB_CHARS):
        if not glob.glob(text):
            raise UsageError(f"--{flag} {value!r}: no file matches this pattern; check the path")
        return
    if os.path.exists(text):
        return
    if looks_local(value):
        raise UsageError(f"--{flag} {value!r}: no such {what}; check the path (a Hub id looks like namespace/name)")
    if _in_hub_cache(text):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"--{flag} {value!r}: no such local {what}, and HF_HUB_OFFLINE is set so it cannot come from "
                         f"the Hub; check the path or unset HF_HUB_OFFLINE")
    if not hub_reachable():  # one short probe instead of the Hub client's retries
        if builtin:
            raise UsageError(f"--{flag} {value!r} is neither a local folder nor an embedded dataset "
                             f"({', '.join(EMBEDDED_DATASETS)}), and the Hugging Face Hub is unreachable (offline?); "
                             "check the path, or the network for a Hub id")
        raise UsageError(f"--{flag} {value!r} is not a local {what}, and the Hugging Face Hub is unreachable "
                         "(offline?); check the path, or the network for a Hub id")


#: seconds :func:`hub_reachable` waits for the Hub's host
HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub's host (``HF_ENDPOINT``, default ``https://huggingface.co``) accepts a TCP connection within
    ``timeout`` seconds (name lookup included): one probe per process, no ``huggingface_hub`` import. A configured
    proxy counts as reachable (the Hub client goes through it; the probe could not)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, name="hub-probe", daemon=True)  # a hung name lookup is abandoned
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a Hub repo (any type) has a folder in the local Hub cache (no huggingface_hub import)."""
    root = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    folder = repo_id.replace("/", "--")
    datasets_root = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "datasets")
    return any(os.path.isdir(os.path.join(root, f"{kind}--{folder}")) for kind in ("models", "datasets", "spaces")) or (
        os.path.isdir(datasets_root) and any(name.startswith(folder.replace("--", "___"))
                                             for name in os.listdir(datasets_root)))


def check_imagefolder_columns(dataset: str | None, columns: Mapping[str, str | None]) -> None:
    """For a local imagefolder (images + ``metadata.csv`` / ``metadata.jsonl``, no dataset card), check the column
    flags (``{"caption_column": "text", ...}``) against the metadata header before anything is imported: its columns
    are ``image`` and the header's, ``file_name`` excepted. Other inputs are checked once loaded."""
    import json

    if not dataset or not os.path.isdir(dataset):
        return
    root = Path(dataset)
    if (root / "README.md").is_file() or (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return
    found = sorted(root.glob("metadata.*")) + sorted(root.glob("*/metadata.*"))
    found = [p for p in found if p.suffix in (".csv", ".jsonl")]
    if not found:
        return
    first = found[0]
    with first.open(encoding="utf-8") as handle:
        line = handle.readline()
    try:
        header = line.strip().split(",") if first.suffix == ".csv" else list(json.loads(line))
    except ValueError:
        return
    existing = ["image", *(c.strip().strip('"') for c in header if c.strip().strip('"') != "file_name")]
    for flag, column in columns.items():
        if column is not None and column not in existing:
            raise UsageError(f"column {column!r} ({flag}) not found in {first}; existing columns: {existing} "
                             f"(pass --{flag} <one of them>)")


def check_output_dir(output_dir: str | Path, *, overwrite_output_dir: bool = False,
                     resume_from_checkpoint: Any = None) -> Path:
    """Refuse (``OutputDirExistsError``) a non-empty ``output_dir`` unless overwriting or resuming; writes nothing."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite_output_dir and not resume_from_checkpoint:
        shown = sorted(p.name for p in path.iterdir())[:5]
        raise OutputDirExistsError(
            f"output_dir {str(path)!r} is not empty (holds {shown}{' ...' if len(shown) == 5 else ''}). Pass "
            f"--overwrite_output_dir true to replace the files this run writes (nothing else is deleted), "
            f"--resume_from_checkpoint to continue it, or choose another --output_dir.")
    return path


def prepare_output_dir(output_dir: str | Path, *, overwrite_output_dir: bool = False,
                       resume_from_checkpoint: Any = None) -> Path:
    """Create ``output_dir`` or check that writing into it is allowed; return it as a ``Path``.

    A missing or empty folder is always fine. A non-empty one needs ``overwrite_output_dir=True`` (the recipe then
    overwrites only its own files) or a ``resume_from_checkpoint`` (the run continues what is there).
    """
    path = check_output_dir(output_dir, overwrite_output_dir=overwrite_output_dir,
                            resume_from_checkpoint=resume_from_checkpoint)
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


def default_cpu_threads() -> int:
    """torch intra-op threads for a CPU process: 1 per process under a multi-process launch (``WORLD_SIZE`` /
    ``LOCAL_WORLD_SIZE`` > 1), else the cores left idle by other work (``os.cpu_count()`` minus the 1-minute load
    average), at least 1. torch's own default (every core) oversubscribes a busy machine: the main job's 50 steps took
    17.9 s with 2 threads and 2.8 s with 1 on 2 shared cores (load ~7)."""
    if max(int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) > 1:
        return 1
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy)))


def configure_cpu_threads(threads: int | None = None, *, use_cpu: bool = False) -> int | None:
    """Set torch's intra-op threads for a CPU run and return the number (``None``: left as they are).

    ``threads`` (``--threads``) always wins. Otherwise an ``OMP_NUM_THREADS`` in the environment is respected and a
    run on a GPU is left alone; a CPU run gets :func:`default_cpu_threads`."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
    elif os.environ.get("OMP_NUM_THREADS"):
        return None
    elif not use_cpu and (torch.cuda.is_available() or getattr(torch.backends, "mps", None) is not None
                          and torch.backends.mps.is_available()):
        return None
    threads = threads or default_cpu_threads()
    torch.set_num_threads(threads)
    return threads
