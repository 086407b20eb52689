"""Curate an image-text dataset with a trained dual encoder: GSC clean probability, similarity, DISSect score.

    python recipes/curate.py --model_name_or_path outputs/clip_dissect --output_dir outputs/curated
    accelerate launch --multi_gpu --num_processes 2 recipes/curate.py --use_cpu ...    # 2 CPU processes
    python recipes/curate.py --dataset my/pairs --split train --keep_fraction 0.7 \\
        --training_state outputs/clip_dissect/checkpoint-400 --push_to_hub --hub_dataset_id me/pairs-curated

Settings come from the YAML ``--config`` (default ``recipes/configs/curate_default.yaml``); flags override it.

One batched no-grad pass embeds every pair (under ``accelerate launch`` each process embeds its share of the
batches; the embeddings are gathered and process 0 scores and writes). Added columns:

- ``gsc_clean_prob``: one-pass GSC clean probability (:func:`hf_mmsel.gsc.scoring.gsc_clean_probability`);
- ``similarity``: image-text cosine of the model;
- ``dissect_score`` (with ``--training_state`` holding a DISSect score bank): ``h - s``, the historical CLIPScore
  of the training run minus the model's current one (``s = 100*max(cos, 0)``; NaN for never-scored pairs);
- ``gsc_weight`` (with ``--training_state`` holding GSC buffers): the per-sample weight ``w`` of GSC training.

Then the rows with ``--select_by`` (default ``gsc_clean_prob``) >= ``--threshold`` (default 0.5) are kept, or the
``--keep_fraction`` highest. Written to ``--output_dir``: the curated split (``save_to_disk``; load it with
``datasets.load_from_disk``), ``score_histogram.png``, ``curation_stats.json`` and a dataset card ``README.md``;
``--push_to_hub --hub_dataset_id`` uploads dataset, card, histogram and statistics.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "curate_default.yaml"
STATE_FILE_NAME = "selection_state.safetensors"  # written by ContrastiveTrainer into every checkpoint
HISTOGRAM_NAME = "score_histogram.png"
STATS_NAME = "curation_stats.json"
SCORE_COLUMNS = ("gsc_clean_prob", "similarity", "dissect_score", "gsc_weight")
SELECTABLE = {"gsc_clean_prob": (0.0, 1.0), "gsc_weight": (0.0, 1.0), "similarity": (-1.0, 1.0)}
COLUMN_DOCS = {
    "gsc_clean_prob": "GSC clean probability from one pass of the curating model: min of the structure-consistency "
    "posterior and the positive-pair posterior (higher = cleaner)",
    "similarity": "image-text cosine similarity of the curating model",
    "dissect_score": "DISSect differential h - s: historical CLIPScore of the training run minus the current one "
    "(NaN if the pair was never scored)",
    "gsc_weight": "per-sample GSC weight w at the end of training (from the training state)",
}


@dataclass
class CurateArguments:
    """What to score, with which model, how to select, where to write."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Trained dual encoder (local folder or Hub id) saved with its tokenizer."}
    )
    dataset: str | None = field(default=None, metadata={"help": "Hub id or local folder; default: embedded easy-vqa."})
    split: str = field(default="train", metadata={"help": "Split to curate."})
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    label_column: str | None = field(default=None)
    max_samples: int | None = field(default=None, metadata={"help": "Curate only the first n rows."})
    noise_ratio: float = field(
        default=0.0, metadata={"help": "Inject NCR noise first (demo/benchmark; adds the is_noisy ground truth)."}
    )
    noise_seed: int = field(default=0)
    output_dir: str = field(default="outputs/curated")
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    keep_fraction: float | None = field(default=None, metadata={"help": "Keep this fraction (0, 1] of highest scores."})
    threshold: float | None = field(
        default=None, metadata={"help": "Keep rows with score >= threshold (default 0.5 when no --keep_fraction)."}
    )
    select_by: str = field(default="gsc_clean_prob", metadata={"help": f"One of {sorted(SELECTABLE)}."})
    training_state: str | None = field(
        default=None, metadata={"help": f"A checkpoint folder or its {STATE_FILE_NAME} (DISSect bank, GSC buffers)."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Image size when the model folder has no image-processor config."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Caption token limit (default: the model's)."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per embedding batch and process."})
    num_anchors: int = field(default=512, metadata={"help": "GSC anchor pairs (structure profiles)."})
    chunk_size: int = field(default=128, metadata={"help": "Pairs per softmax chunk of the positive probability."})
    prob_posterior: bool = field(default=True, metadata={"help": "GMM posterior of p instead of raw p in the min."})
    structure_similarity: str = field(default="sigmoid", metadata={"help": "Profile map: 'sigmoid' or 'affine'."})
    structure_temperature: float = field(default=0.3, metadata={"help": "Temperature of the sigmoid profile map."})
    structure_centered: bool = field(default=True, metadata={"help": "Row-centre the profiles (Pearson)."})
    seed: int = field(default=0)
    use_cpu: bool = field(default=False, metadata={"help": "Force CPU (needed for multi-process CPU runs)."})
    dataloader_num_workers: int = field(default=0)
    push_to_hub: bool = field(default=False)
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Dataset repo id <namespace/name>."})
    hub_token: str | None = field(default=None, metadata={"help": "Default: HF_TOKEN / `hf auth login`."})
    hub_private: bool = field(default=False)


def parse_args(argv: list[str] | None = None) -> CurateArguments:
    """:class:`CurateArguments` from the ``--config`` YAML, overridden by command-line flags."""
    from hf_mmsel.cli import parse_args_with_config

    (args,) = parse_args_with_config(CurateArguments, argv, default_config=DEFAULT_CONFIG)
    return args


# ------------------------------------------------------------------------------------------- validation
def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def resolve_token(args: CurateArguments) -> str | None:
    """The Hub token for ``--push_to_hub`` (checked before any work); ``None`` when not pushing."""
    if not args.push_to_hub:
        return None
    from hf_mmsel.hub import resolve_hub_token

    if not args.hub_dataset_id:
        raise ValueError("--push_to_hub needs --hub_dataset_id <namespace/name>")
    return resolve_hub_token(args.hub_token, repo_id=args.hub_dataset_id)


def validate_args(args: CurateArguments) -> None:
    """Every check that needs neither the model nor the data (run before loading anything)."""
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a trained dual encoder folder or Hub id)")
    if args.select_by not in SELECTABLE:
        raise ValueError(f"--select_by must be one of {sorted(SELECTABLE)}, got {args.select_by!r}")
    if args.keep_fraction is not None and args.threshold is not None:
        raise ValueError(
            f"give --keep_fraction ({args.keep_fraction}) or --threshold ({args.threshold}), not both"
        )
    if args.keep_fraction is not None and not 0.0 < args.keep_fraction <= 1.0:
        raise ValueError(f"--keep_fraction must lie in (0, 1], got {args.keep_fraction}")
    lo, hi = SELECTABLE[args.select_by]
    if args.threshold is not None and not (math.isfinite(args.threshold) and lo <= args.threshold <= hi):
        raise ValueError(f"--threshold must lie in [{lo:g}, {hi:g}] for {args.select_by}, got {args.threshold}")
    from hf_mmsel.gsc import StructureConfig

    StructureConfig(similarity=args.structure_similarity, temperature=args.structure_temperature)  # raises if bad
    if args.batch_size < 1 or args.num_anchors < 1 or args.chunk_size < 2:
        raise ValueError("--batch_size and --num_anchors must be >= 1 and --chunk_size >= 2")
    if not 0.0 <= args.noise_ratio < 1.0:
        raise ValueError(f"--noise_ratio must lie in [0, 1), got {args.noise_ratio}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output_dir {str(out)!r} is not empty; pass --overwrite to replace it")
    for name in ("dataset", "model_name_or_path", "training_state"):
        source = getattr(args, name)
        if source and Path(source).exists() and _contains(out, Path(source)):
            raise ValueError(f"--output_dir {str(out)!r} contains --{name} {source!r}; curating would destroy it")


# ----------------------------------------------------------------------------------------- model / data
def load_dual_encoder(args: CurateArguments):
    """``(model, tokenizer, image_transform, max_length)`` with the model/preprocessing consistency checks."""
    from transformers import AutoModel, AutoTokenizer

    from hf_mmsel.data.image_transform import ImageTransform, default_image_transform
    from hf_mmsel.models import check_dual_encoder

    path = args.model_name_or_path
    model = AutoModel.from_pretrained(path)
    check_dual_encoder(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no tokenizer found with the model {path!r}: save it next to the weights "
            "(tokenizer.save_pretrained, or Trainer(processing_class=tokenizer))"
        ) from err
    config = model.config
    text_config = getattr(config, "text_config", None)
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ValueError(
            f"model/tokenizer mismatch: the tokenizer of {path!r} has {len(tokenizer)} tokens but the text "
            f"model's embedding table has {vocab} rows"
        )
    positions = getattr(text_config, "max_position_embeddings", None)
    limits = [n for n in (args.max_length, getattr(tokenizer, "model_max_length", None), positions)
              if n is not None and n < 1_000_000]
    max_length = int(min(limits)) if limits else 77
    if args.max_length is not None and positions is not None and args.max_length > positions:
        raise ValueError(f"--max_length {args.max_length} exceeds the text model's {positions} positions")

    vision_size = getattr(getattr(config, "vision_config", None), "image_size", None)
    transform = None
    if (Path(path) / "preprocessor_config.json").is_file() or not Path(path).exists():
        try:
            transform = ImageTransform.from_image_processor(path)
        except (OSError, ValueError):
            transform = None
    if transform is None:
        size = args.image_size or vision_size
        if size is None:
            raise ValueError(f"{path!r} has no image-processor config and no vision_config.image_size: pass --image_size")
        transform = default_image_transform(int(size))
    elif args.image_size is not None and tuple(transform.size) != (args.image_size, args.image_size):
        raise ValueError(
            f"--image_size {args.image_size} contradicts the image processor of {path!r} (size {transform.size})"
        )
    if vision_size is not None and tuple(transform.size) != (int(vision_size), int(vision_size)):
        raise ValueError(
            f"image size mismatch: images would be {transform.size[0]}x{transform.size[1]} but the vision model of "
            f"{path!r} expects {vision_size}x{vision_size} (vision_config.image_size)"
        )
    return model, tokenizer, transform, max_length


def load_source(args: CurateArguments):
    """The split to curate, with the standard columns (and NCR noise when ``--noise_ratio`` > 0)."""
    from hf_mmsel.data import inject_noisy_correspondence, load_image_text_dataset

    ds = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                 label_column=args.label_column, split=args.split, max_samples=args.max_samples)
    if args.noise_ratio > 0:
        ds = inject_noisy_correspondence(ds, args.noise_ratio, seed=args.noise_seed,
                                         label_column="label" if "label" in ds.column_names else None)
    if len(ds) < 2:
        raise ValueError(f"need at least 2 pairs to curate, split {args.split!r} has {len(ds)}")
    clash = [c for c in SCORE_COLUMNS if c in ds.column_names]
    if clash:
        raise ValueError(f"the dataset already has score column(s) {clash}; curate the source dataset instead")
    return ds


def read_training_state(path: str, num_rows: int) -> dict[str, Any]:
    """DISSect bank (``hist``/``seen``) and GSC weights from a ContrastiveTrainer ``selection_state.safetensors``.

    Keys are hook-prefixed (``HookList``: ``"{i}."``): the selection hook's ``{i}.bank.hist``/``{i}.bank.seen``
    and the GSC hook's ``{i}.buffers.weight`` (plus ``buffers.num_updates``). Raises when the file holds neither
    or was written for a different number of samples."""
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / STATE_FILE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"--training_state: {str(file)!r} not found (expected a checkpoint folder holding "
                                f"{STATE_FILE_NAME} or the file itself)")
    state = load_file(str(file))
    out: dict[str, Any] = {}
    hist_keys = sorted(k for k in state if k == "bank.hist" or k.endswith(".bank.hist"))
    for key in hist_keys:
        seen_key = key[: -len("hist")] + "seen"
        if seen_key in state:
            out["dissect_hist"], out["dissect_seen"] = state[key].float(), state[seen_key].bool()
            out["dissect_key"] = key
            break
    weight_keys = sorted(k for k in state if k == "buffers.weight" or k.endswith(".buffers.weight"))
    if weight_keys:
        key = weight_keys[0]
        out["gsc_weight"] = state[key].float()
        updates = state.get(key[: -len("weight")] + "num_updates")
        out["gsc_num_updates"] = int(updates) if updates is not None else None
        out["gsc_key"] = key
    if "dissect_hist" not in out and "gsc_weight" not in out:
        raise ValueError(
            f"{str(file)!r} holds no DISSect score bank (*.bank.hist/*.bank.seen) and no GSC buffers "
            f"(*.buffers.weight); keys: {sorted(state)[:12]}"
        )
    for name in ("dissect_hist", "gsc_weight"):
        if name in out and out[name].numel() != num_rows:
            raise ValueError(
                f"training state / dataset mismatch: {str(file)!r} was written for {out[name].numel()} training "
                f"samples ({out['gsc_key' if name == 'gsc_weight' else 'dissect_key']}) but the curated split has "
                f"{num_rows} rows; curate the same dataset (split, max_samples, noise) the model was trained on"
            )
    if "dissect_seen" in out and not bool(out["dissect_seen"].any()):
        for key in ("dissect_hist", "dissect_seen", "dissect_key"):  # e.g. strategy 'full': an unused bank
            out.pop(key)
        out["dissect_note"] = "the score bank was never filled (no DISSect strategy): no dissect_score"
    return out


def embed_all(accelerator, model, ds, collator, args: CurateArguments):
    """L2-normalised ``(image_embeds, text_embeds)`` [N, D] (CPU float32) of every row, on every process.

    The batches (fixed row ranges, identical for any world size) are split between processes; each embeds its
    share; the results are gathered and scattered back by row index."""
    import torch
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    from hf_mmsel.metrics import embed_dataset

    n = len(ds)
    batches = [(start, min(start + args.batch_size, n)) for start in range(0, n, args.batch_size)]
    with accelerator.split_between_processes(batches) as mine:
        rows = [i for start, stop in mine for i in range(start, stop)]
    local: dict[str, torch.Tensor] = {}
    if rows:
        loader = DataLoader(ds.select(rows), batch_size=args.batch_size, shuffle=False, collate_fn=collator,
                            num_workers=args.dataloader_num_workers)
        local = embed_dataset(model, loader, device=accelerator.device)
        local = {k: local[k] for k in ("image_embeds", "text_embeds", "sample_idx")}
    parts = [p for p in gather_object([local]) if p]
    dim = parts[0]["image_embeds"].shape[1]
    image, text = torch.zeros(n, dim), torch.zeros(n, dim)
    filled = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        idx = part["sample_idx"].long()
        image[idx], text[idx], filled[idx] = part["image_embeds"], part["text_embeds"], True
    if not bool(filled.all()):
        raise RuntimeError(f"{int((~filled).sum())} rows were not embedded (sample_idx must be 0..N-1)")
    return image, text


# --------------------------------------------------------------------------------------------- scoring
def score_pairs(image, text, logit_scale: float, args: CurateArguments, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """All score columns (numpy [N]) plus the GSC diagnostics."""
    from hf_mmsel.gsc import StructureConfig
    from hf_mmsel.gsc.scoring import gsc_clean_probability

    structure = StructureConfig(similarity=args.structure_similarity, temperature=args.structure_temperature,
                                centered=args.structure_centered)
    gsc = gsc_clean_probability(image, text, logit_scale, num_anchors=args.num_anchors, chunk_size=args.chunk_size,
                                prob_posterior=args.prob_posterior, structure=structure, seed=args.seed)
    cos = (image * text).sum(-1)
    scores = {
        "gsc_clean_prob": gsc["clean_prob"].numpy(),
        "similarity": cos.numpy(),
        "_consistency": gsc["consistency"].numpy(),
        "_positive_prob": gsc["positive_prob"].numpy(),
    }
    if "dissect_hist" in state:
        current = 100.0 * cos.clamp(min=0.0)
        diff = state["dissect_hist"] - current
        scores["dissect_score"] = np.where(state["dissect_seen"].numpy(), diff.numpy(), np.nan).astype(np.float32)
    if "gsc_weight" in state:
        scores["gsc_weight"] = state["gsc_weight"].numpy()
    return scores


def select_rows(values: np.ndarray, args: CurateArguments) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices (ascending) of the kept rows and a description of the rule."""
    if args.keep_fraction is not None:
        k = max(1, int(round(args.keep_fraction * values.size)))
        order = np.argsort(-values, kind="stable")  # ties: earlier rows first
        return np.sort(order[:k]), {"rule": "keep_fraction", "keep_fraction": args.keep_fraction}
    threshold = 0.5 if args.threshold is None else args.threshold
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


# ---------------------------------------------------------------------------------------- card / Hub
def _source_name(args: CurateArguments) -> str:
    base = args.dataset or "embedded easy-vqa captions (hf_mmsel.data)"
    extra = f", split {args.split}"
    if args.max_samples:
        extra += f", first {args.max_samples} rows"
    if args.noise_ratio > 0:
        extra += f", {args.noise_ratio:.0%} NCR-shuffled captions (seed {args.noise_seed})"
    return base + extra


def build_card(args: CurateArguments, stats: dict[str, Any], card_data=None):
    from hf_mmsel.hub import dataset_card_data, render_card

    if card_data is None:
        is_hub_id = args.dataset is not None and not Path(args.dataset).exists()
        card_data = dataset_card_data(tags=["image-text", "noisy-correspondence", "gsc"],
                                      source_datasets=[args.dataset] if is_hub_id else None)
    settings = {"model": args.model_name_or_path, "selected by": args.select_by, **stats["selection"],
                "GSC anchors": f"{args.num_anchors} (random, seed {args.seed})",
                "profiles": f"{args.structure_similarity}, t={args.structure_temperature}, centred={args.structure_centered}", "p chunk size": args.chunk_size,
                "p as GMM posterior": args.prob_posterior, "logit scale": round(stats["logit_scale"], 3),
                "training state": args.training_state or "none", "processes": stats["world_size"]}
    columns = {name: COLUMN_DOCS[name] for name in SCORE_COLUMNS if name in stats["score_columns"]}
    return render_card(
        "curated_dataset_card", card_data=card_data,
        dataset_id=args.hub_dataset_id or Path(args.output_dir).name,
        source_dataset=_source_name(args), method="gsc" + (" + dissect" if "dissect_score" in columns else ""),
        settings=settings, num_source=stats["num_source"], num_kept=stats["num_kept"],
        estimated_noise_rate=stats["estimated_noise_rate"], score_column=args.select_by,
        histogram_image=HISTOGRAM_NAME, score_columns=columns, detection=stats.get("detection_auroc"),
    )


def push(curated, args: CurateArguments, token: str, stats: dict[str, Any], out: Path) -> None:
    """Dataset via ``Dataset.push_to_hub``, then card (keeping the YAML datasets wrote), histogram, stats."""
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    from hf_mmsel.hub import dataset_card_data

    repo_id = args.hub_dataset_id
    curated.push_to_hub(repo_id, split=args.split, token=token, private=args.hub_private,
                        commit_message="Upload dataset curated with hf_mmsel")
    try:  # datasets' README carries configs/dataset_info: merge our metadata into it
        pushed = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
    except Exception:  # noqa: BLE001 - a missing README only loses the dataset_info block
        pushed = {}
    ours = build_card(args, stats).data.to_dict()
    merged = {**pushed, **{k: v for k, v in ours.items() if v is not None}}
    card = build_card(args, stats, card_data=dataset_card_data(**merged))
    HfApi(token=token).create_commit(
        repo_id, repo_type="dataset", commit_message="Add curation card, score histogram and statistics",
        operations=[CommitOperationAdd("README.md", str(card).encode()),
                    CommitOperationAdd(HISTOGRAM_NAME, str(out / HISTOGRAM_NAME)),
                    CommitOperationAdd(STATS_NAME, str(out / STATS_NAME))],
    )


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    validate_args(args)
    token = resolve_token(args)  # before any work

    import torch
    from accelerate import Accelerator

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.models import logit_scale_of

    accelerator = Accelerator(cpu=args.use_cpu)
    model, tokenizer, transform, max_length = load_dual_encoder(args)
    with accelerator.main_process_first():
        ds = load_source(args)
    state = read_training_state(args.training_state, len(ds)) if args.training_state else {}
    if args.select_by == "gsc_weight" and "gsc_weight" not in state:
        raise ValueError("--select_by gsc_weight needs a --training_state with GSC buffers")

    model.to(accelerator.device).eval()
    collator = ImageTextCollator(tokenizer, image_transform=transform, max_length=max_length)
    start = time.perf_counter()
    with torch.no_grad():
        image, text = embed_all(accelerator, model, ds, collator, args)
    embed_seconds = time.perf_counter() - start
    logit_scale = float(logit_scale_of(model).detach().cpu())
    stats: dict[str, Any] = {"world_size": accelerator.num_processes}
    if accelerator.is_main_process:
        start = time.perf_counter()
        scores = score_pairs(image, text, logit_scale, args, state)
        score_seconds = time.perf_counter() - start
        keep, selection = select_rows(scores[args.select_by], args)
        if keep.size == 0:
            raise ValueError(
                f"no pair has {args.select_by} >= {selection['threshold']} (max {np.nanmax(scores[args.select_by]):.3f}); "
                "lower --threshold or use --keep_fraction"
            )
        clean_prob = scores["gsc_clean_prob"]
        is_noisy = np.asarray(ds["is_noisy"], dtype=bool) if "is_noisy" in ds.column_names else None
        stats.update(
            num_source=len(ds), num_kept=int(keep.size), selection=selection,
            estimated_noise_rate=float((clean_prob < 0.5).mean()), logit_scale=logit_scale,
            score_columns=[c for c in SCORE_COLUMNS if c in scores], embed_seconds=round(embed_seconds, 3),
            score_seconds=round(score_seconds, 3),
            score_means={k.lstrip("_"): float(np.nanmean(v)) for k, v in scores.items()},
            args=asdict(args) | {"hub_token": None},
        )
        if "gsc_num_updates" in state:
            stats["gsc_weight_epoch_updates"] = state["gsc_num_updates"]
        if "dissect_note" in state:
            stats["note"] = state["dissect_note"]
        if is_noisy is not None:
            stats["true_noise_rate"] = float(is_noisy.mean())
            stats["kept_noise_rate"] = float(is_noisy[keep].mean()) if keep.size else float("nan")
            stats["detection_auroc"] = detection_aurocs(scores, is_noisy)

        from datasets import Value

        scored = ds
        for name in SCORE_COLUMNS:
            if name in scores:
                scored = scored.add_column(name, scores[name].astype(np.float32), feature=Value("float32"))
        curated = scored.select(keep)
        out = Path(args.output_dir)
        if out.is_dir() and any(out.iterdir()):  # validated: --overwrite was given
            shutil.rmtree(out)
        curated.save_to_disk(str(out))
        plot_histograms(scores, is_noisy, stats.get("detection_auroc", {}), out / HISTOGRAM_NAME)
        (out / STATS_NAME).write_text(json.dumps(stats, indent=2, default=str))
        build_card(args, stats).save(str(out / "README.md"))
        if args.push_to_hub:
            push(curated, args, token, stats, out)
    accelerator.wait_for_everyone()
    return stats


if __name__ == "__main__":
    main()
