"""What a curation run writes besides the score files: its configuration (what the scores depend on), the kept
rows, detection AUROCs, the score histogram and the curated subset.

Layout of a curation folder: ``scores/``, ``fit/``, ``raw/``, ``anchors.safetensors``, ``mixture.json``,
``manifest.json`` (:mod:`.pipeline`), plus :data:`CONFIG_NAME`, :data:`STATS_NAME`, :data:`HISTOGRAM_NAME`, the
card ``README.md`` and :data:`CURATED_DIR` (these :data:`OWN_OUTPUTS` are the only files an overwrite removes).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE_NAME = "selection_state.safetensors"  # the hook state of hf_mmsel <= 0.1 checkpoints
HISTOGRAM_NAME = "score_histogram.png"
STATS_NAME = "curation_stats.json"
CONFIG_NAME = "curation_config.json"
CURATED_DIR = "curated"
SCORE_COLUMNS = ("curation_score", "gsc_clean_prob", "similarity", "neg_clip_loss", "dissect_score", "gsc_weight")
#: score columns a subset may be selected by, with their value range (negCLIPLoss = s_ii - R <= 0)
SELECTABLE = {"curation_score": (0.0, 1.0), "gsc_clean_prob": (0.0, 1.0), "gsc_weight": (0.0, 1.0),
              "similarity": (-1.0, 1.0), "neg_clip_loss": (-math.inf, 0.0)}
COLUMN_DOCS = {
    "curation_score": "the default ranking: the mean pool quantile of the curation_score_components (default: "
    "negCLIPLoss alone); in [0, 1], higher = cleaner",
    "neg_clip_loss": "negCLIPLoss (Wang et al., 2024): the image-text cosine minus a normaliser from the pair's "
    "similarities to random in-batch contrast pairs, averaged over K seeded batches (higher = cleaner)",
    "gsc_clean_prob": "GSC clean probability from one pass of the curating model: min of the structure-consistency "
    "posterior and the positive-pair posterior (higher = cleaner)",
    "similarity": "image-text cosine similarity of the curating model",
    "dissect_score": "DISSect differential h - s: historical CLIPScore of the training run minus the current one "
    "(NaN if the pair was never scored)",
    "gsc_weight": "per-sample GSC weight w at the end of training (from the training state)",
}
#: every file / folder a curation run writes (and the only ones an overwrite removes)
OWN_OUTPUTS = ("scores", "fit", "raw", "anchors.safetensors", "mixture.json", "manifest.json", CONFIG_NAME, STATS_NAME,
               HISTOGRAM_NAME, "README.md", CURATED_DIR)

__all__ = [
    "COLUMN_DOCS", "CONFIG_NAME", "CURATED_DIR", "HISTOGRAM_NAME", "OWN_OUTPUTS", "SCORE_COLUMNS", "SELECTABLE",
    "STATE_FILE_NAME", "STATS_NAME", "detection_aurocs", "input_files_fingerprint", "model_fingerprint",
    "plot_histograms", "prepare_curation_dir", "select_rows", "training_state_sha256", "write_curated_subset",
]


def model_fingerprint(model) -> str:
    """sha256 of every parameter and buffer (names, dtypes, bytes): a changed model changes the scores."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def training_state_sha256(path: str | None) -> str | None:
    """sha256 of everything a training state holds: a checkpoint folder's ``hook_state/`` files (names and bytes),
    or a hf_mmsel <= 0.1 :data:`STATE_FILE_NAME` (the folder's, or the file itself); ``None`` without one."""
    from hf_mmsel.state.checkpoint import HOOK_STATE_DIR

    if not path:
        return None
    root = Path(path)
    if (root / HOOK_STATE_DIR).is_dir():
        h = hashlib.sha256()
        for file in sorted(p for p in (root / HOOK_STATE_DIR).rglob("*") if p.is_file()):
            h.update(f"{file.relative_to(root).as_posix()}\0{file.stat().st_size}\n".encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    file = root / STATE_FILE_NAME if root.is_dir() else root
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def input_files_fingerprint(paths: list[str]) -> str:
    """sha256 of every input shard's name, size and modification time: a shard rewritten in place (same member
    names and sizes, other content) changes it without reading the pool."""
    h = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        h.update(f"{Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_curation_dir(out: Path, config: dict[str, Any], overwrite_output_dir: bool) -> str:
    """Fresh folder, resume (same :data:`CONFIG_NAME`) or, with ``overwrite_output_dir``, replace the
    :data:`OWN_OUTPUTS` (other files are kept). Returns "new" | "resume" | "overwrite"."""
    from hf_mmsel.recipes.run_utils import OutputDirExistsError, prepare_output_dir

    config_file = out / CONFIG_NAME
    if config_file.is_file():
        previous = json.loads(config_file.read_text())
        if previous == config:
            return "resume"
        if not overwrite_output_dir:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise OutputDirExistsError(
                f"--output_dir {str(out)!r} holds scores of another run (changed: {changed}); pass "
                "--overwrite_output_dir true to replace curate's outputs there, or choose another --output_dir"
            )
    elif not overwrite_output_dir:
        prepare_output_dir(out)  # refuses a non-empty folder that curate did not start
    out.mkdir(parents=True, exist_ok=True)
    removed = False
    for name in OWN_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
            removed = True
        elif target.exists():
            target.unlink()
            removed = True
    config_file.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return "overwrite" if removed else "new"


def select_rows(values: np.ndarray, keep_fraction: float | None = None,
                threshold: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices (ascending) of the kept rows and a description of the rule: the ``keep_fraction`` highest values
    (ties: earlier rows first), else the rows with a value ``>= threshold`` (default 0.5)."""
    if keep_fraction is not None:
        k = max(1, int(round(keep_fraction * values.size)))
        order = np.argsort(-values, kind="stable")  # ties: earlier rows first
        return np.sort(order[:k]), {"rule": "keep_fraction", "keep_fraction": keep_fraction}
    threshold = 0.5 if threshold is None else threshold
    return np.flatnonzero(values >= threshold), {"rule": "threshold", "threshold": threshold}


def detection_aurocs(scores: dict[str, np.ndarray], is_noisy: np.ndarray) -> dict[str, float]:
    """AUROC (clean pairs = positives) of each clean-type score; ``dissect_score`` is not one (DISSect keeps
    the pairs whose score fell most, a learnability signal), so it is reported negated as ``-dissect_score``."""
    from hf_mmsel.metrics import auroc

    clean = ~is_noisy.astype(bool)
    out = {}
    for name, values in scores.items():
        name = name.lstrip("_")
        if name == "dissect_score":
            finite = np.isfinite(values)
            out["-dissect_score"] = auroc(-values[finite], clean[finite]) if finite.any() else float("nan")
        else:
            out[name] = auroc(values, clean)
    return out


def plot_histograms(scores: dict[str, np.ndarray], is_noisy: np.ndarray | None, aurocs: dict[str, float],
                    path: Path) -> Path:
    """Histograms of ``gsc_clean_prob`` and ``similarity`` (clean vs noisy when ``is_noisy`` is known) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gsc_clean_prob", (0.0, 1.0)), ("similarity", (-1.0, 1.0))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0))
    for ax, (name, (lo, hi)) in zip(axes, panels):
        values = scores[name]
        bins = np.linspace(lo, hi, 41)
        if is_noisy is not None:
            for flag, label, colour in ((False, "clean", "tab:blue"), (True, "noisy", "tab:red")):
                sel = values[is_noisy.astype(bool) == flag]
                if sel.size:
                    ax.hist(sel, bins=bins, alpha=0.6, color=colour, label=f"{label} ({sel.size})")
            ax.set_title(f"{name} (AUROC {aurocs.get(name, float('nan')):.3f})", fontsize=9)
            ax.legend(fontsize=8)
        else:
            ax.hist(values, bins=bins, color="tab:gray")
            ax.set_title(name, fontsize=9)
        ax.set_xlabel(name)
        ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_curated_subset(source, scores: dict[str, np.ndarray], keep: np.ndarray, out: Path):
    """:data:`CURATED_DIR`: a ``datasets`` folder (map-style input, with the score columns) or the kept samples of
    every input shard in its own format (:func:`~hf_mmsel.data.shard_writer.write_kept_samples`). Returns the
    curated ``Dataset`` (map-style input) or ``None``."""
    from datasets import Value

    target = out / CURATED_DIR
    if target.exists():
        shutil.rmtree(target)
    keep_idx = scores["sample_idx"][keep]
    if source.kind != "map":
        from hf_mmsel.data.shard_writer import write_kept_samples

        write_kept_samples(source.manifest, keep_idx, target)
        return None
    curated = source.dataset.select(keep_idx.tolist())
    for name in SCORE_COLUMNS:
        if name in scores:
            curated = curated.add_column(name, scores[name][keep].astype(np.float32), feature=Value("float32"))
    curated.save_to_disk(str(target))
    return curated
