"""Curate an image-text pool with a trained dual encoder, streamed shard by shard (web scale, resumable).

    python recipes/curate.py --model_name_or_path outputs/clip_dissect --dataset pool/ --output_dir outputs/cur
    accelerate launch --multi_gpu --num_processes 8 recipes/curate.py --dataset "pool/*.tar" ...   # shards split
    python recipes/curate.py --engine ray --ray_num_actors 8 --ray_num_gpus_per_actor 1 --dataset pool/ ...
    python recipes/curate.py --dataset my/pairs --keep_fraction 0.7 --training_state ckpt/checkpoint-400 \\
        --push_to_hub --hub_dataset_id me/pairs-curated

Settings come from the YAML ``--config`` (default ``curate_default``, a packaged config); flags override it.

Input: WebDataset ``.tar`` / parquet shards (a local folder or glob, or a Hub id with ``--streaming``) read
through their manifest (stable ``sample_idx``), or a map-style dataset (embedded easy-vqa, ``save_to_disk``
folder, Hub id) scored in virtual shards of ``--samples_per_shard`` rows. Nothing holds the pool: see
:mod:`hf_mmsel.curation` for the scores (GSC clean probability against a fixed seeded anchor set with a
mixture fitted once on seeded fit shards, similarity, and with ``--training_state`` DISSect's score and GSC's
training weight).

Written to ``--output_dir``: ``scores/<shard>.parquet`` (``key``, ``sample_idx``, score columns),
``manifest.json`` (finished shards), ``anchors.safetensors``, ``mixture.json``, ``fit/``,
``curation_config.json`` (what the scores depend on), ``curation_stats.json``, ``score_histogram.png``, the
dataset card ``README.md`` and, with ``--threshold`` / ``--keep_fraction``, the curated subset in ``curated/``
(WebDataset / parquet shards for shard input, a ``datasets`` folder for map-style input). A re-run of the same
command resumes (finished shards are skipped; outputs are byte-identical to an uninterrupted run); a changed
model, input or scoring setting is refused unless ``--overwrite_output_dir``, which replaces only these files.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_mmsel.curation.outputs import (
    COLUMN_DOCS,
    CURATED_DIR,
    HISTOGRAM_NAME,
    SCORE_COLUMNS,
    SELECTABLE,
    STATE_FILE_NAME,
    STATS_NAME,
    detection_aurocs,
    input_files_fingerprint,
    model_fingerprint,
    plot_histograms,
    prepare_curation_dir,
    select_rows,
    training_state_sha256,
    write_curated_subset,
)
from hf_mmsel.curation.curation_score import COMPONENTS, DEFAULT_COMPONENTS, parse_components
from hf_mmsel.curation.scoring import MIN_SEPARATION
from hf_mmsel.recipes.run_utils import caption_column_field, image_column_field, label_column_field

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "curate_default.yaml"
PROG = "hf-mmsel curate"


@dataclass
class CurateArguments:
    """What to score, with which model, how to select, where to write."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Trained dual encoder (local folder or Hub id) saved with its tokenizer."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Shard folder/glob (WebDataset .tar or parquet), save_to_disk folder or Hub id; default: "
                  "embedded easy-vqa."},
    )
    streaming: bool = field(default=False, metadata={"help": "Read a Hub --dataset as shards (local shard folders "
                                                              "and globs are detected)."})
    manifest_path: str | None = field(default=None, metadata={"help": "Input shard manifest (default: next to the "
                                                                      "shards, else in --output_dir)."})
    split: str = field(default="train", metadata={"help": "Split to curate (map-style input)."})
    image_column: str = image_column_field()
    caption_column: str = caption_column_field()
    label_column: str | None = label_column_field()
    max_samples: int | None = field(default=None, metadata={"help": "Curate only the first n rows (map-style)."})
    samples_per_shard: int = field(default=10_000, metadata={"help": "Virtual shard size for map-style input."})
    on_bad_sample: str = field(default="raise", metadata={"help": "'raise' or 'skip' (counted in the stats)."})
    noise_ratio: float | None = field(
        default=None, metadata={"help": "Inject NCR noise first (demo/benchmark only; adds is_noisy). Default: none."}
    )
    noise_seed: int = field(default=0)
    output_dir: str = field(default="outputs/curated")
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace curate's outputs in a folder scored with other settings."}
    )
    keep_fraction: float | None = field(default=None, metadata={"help": "Keep this fraction (0, 1] of highest scores."})
    threshold: float | None = field(default=None, metadata={"help": "Keep rows with --select_by >= threshold."})
    select_by: str = field(default="curation_score", metadata={"help": f"One of {sorted(SELECTABLE)}."})
    training_state: str | None = field(
        default=None, metadata={"help": f"A checkpoint folder or its {STATE_FILE_NAME} (DISSect bank, GSC buffers)."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Image size when the model folder has no image-processor config."}
    )
    image_mean: str | None = field(
        default=None, metadata={"help": "Image normalisation mean, 3 comma-separated floats; needed (with "
                                        "--image_std) when the model folder has no preprocessor_config.json."})
    image_std: str | None = field(default=None, metadata={"help": "Image normalisation std (see --image_mean)."})
    max_length: int | None = field(default=None, metadata={"help": "Caption token limit (default: the model's)."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per embedding batch and process."})
    num_anchors: int = field(default=512, metadata={"help": "GSC anchor pairs (structure profiles)."})
    chunk_size: int = field(default=128, metadata={"help": "Pairs per softmax chunk of the positive probability."})
    neg_clip_batch_size: int = field(default=256, metadata={"help": "Pairs per random contrast batch of "
                                                                    "negCLIPLoss."})
    neg_clip_batches: int = field(default=10, metadata={"help": "Random contrast batches per pair (negCLIPLoss's K)."})
    curation_score_components: str = field(
        default=DEFAULT_COMPONENTS, metadata={"help": "'+'-joined scores curation_score averages as pool quantiles, "
                                                      f"from {list(COMPONENTS)} (training-state ones are dropped "
                                                      "without --training_state)."})
    prob_posterior: bool = field(default=True, metadata={"help": "GMM posterior of p instead of raw p in the min."})
    structure_similarity: str = field(default="sigmoid", metadata={"help": "Profile map: 'sigmoid' or 'affine'."})
    structure_temperature: float = field(default=0.1, metadata={"help": "Temperature of the sigmoid profile map."})
    structure_centered: bool = field(default=True, metadata={"help": "Row-centre the profiles (Pearson)."})
    fit_samples: int = field(default=200_000, metadata={"help": "Pairs (whole seeded shards) the mixture is fit on."})
    seed: int = field(default=0)
    engine: str = field(default="accelerate", metadata={"help": "'accelerate' (also plain python) or 'ray'."})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: local)."})
    ray_num_actors: int = field(default=1, metadata={"help": "Model actors in the Ray pool."})
    ray_num_gpus_per_actor: float = field(default=0.0)
    use_cpu: bool = field(default=False, metadata={"help": "Force CPU (needed for multi-process CPU runs)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Decode workers per process (shards split)."})
    show_progress: bool = field(default=True, metadata={"help": "tqdm bar with pairs/s per process."})
    push_to_hub: bool = field(default=False)
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Dataset repo id <namespace/name>."})
    hub_token: str | None = field(default=None, metadata={"help": "Default: HF_TOKEN / `hf auth login`."})
    hub_private: bool = field(default=False)


def parse_args(argv: list[str] | None = None) -> CurateArguments:
    """:class:`CurateArguments` from the ``--config`` YAML, overridden by command-line flags."""
    from hf_mmsel.cli import parse_args_with_config

    (args,) = parse_args_with_config(CurateArguments, argv, default_config=DEFAULT_CONFIG, prog=PROG,
                                     help_sources=[__file__])
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
    if args.push_to_hub and args.threshold is None and args.keep_fraction is None:
        raise ValueError("--push_to_hub uploads the curated subset: give --threshold or --keep_fraction")
    from hf_mmsel.gsc import StructureConfig

    StructureConfig(similarity=args.structure_similarity, temperature=args.structure_temperature)  # raises if bad
    if args.batch_size < 1 or args.num_anchors < 2 or args.chunk_size < 2 or args.fit_samples < 2:
        raise ValueError("--batch_size must be >= 1 and --num_anchors, --chunk_size, --fit_samples >= 2")
    if args.neg_clip_batch_size < 2 or args.neg_clip_batches < 1:
        raise ValueError(f"--neg_clip_batch_size must be >= 2 and --neg_clip_batches >= 1, got "
                         f"{args.neg_clip_batch_size} and {args.neg_clip_batches}")
    parse_components(args.curation_score_components)
    if args.noise_ratio is not None and not 0.0 <= args.noise_ratio < 1.0:
        raise ValueError(f"--noise_ratio must lie in [0, 1), got {args.noise_ratio}")
    if args.on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"--on_bad_sample must be 'raise' or 'skip', got {args.on_bad_sample!r}")
    if args.engine not in ("accelerate", "ray"):
        raise ValueError(f"--engine must be 'accelerate' or 'ray', got {args.engine!r}")
    if args.engine == "ray":
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError as err:
            raise ImportError("--engine ray needs Ray Data: pip install 'hf-mmsel[ray]'") from err
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {str(out)!r} exists and is not a directory")
    for name in ("dataset", "model_name_or_path", "training_state"):
        source = getattr(args, name)
        if source and Path(source).exists() and _contains(out, Path(source)):
            raise ValueError(f"--output_dir {str(out)!r} contains --{name} {source!r}; curating would destroy it")


# ----------------------------------------------------------------------------------------- model / data
def _is_shard_input(args: CurateArguments) -> bool:
    import glob

    if args.dataset is None:
        return False
    if args.streaming:
        return True
    path = Path(args.dataset)
    if path.is_dir():
        from hf_mmsel.data.loading import is_save_to_disk_folder

        if is_save_to_disk_folder(path):
            return False
        return any(q.suffix in (".tar", ".parquet") for q in path.rglob("*") if q.is_file())
    if path.is_file():
        return path.suffix in (".tar", ".parquet")
    return bool(glob.glob(args.dataset)) and any(q.endswith((".tar", ".parquet")) for q in glob.glob(args.dataset))


def load_source(args: CurateArguments, *, is_main_process: bool = True):
    """A :class:`~hf_mmsel.curation.ShardedSource` (shards + manifest) or a
    :class:`~hf_mmsel.curation.MapStyleSource` (with NCR noise only when ``--noise_ratio`` is given)."""
    from hf_mmsel.curation import MapStyleSource, ShardedSource

    if _is_shard_input(args):
        from hf_mmsel.data.loading import resolve_shard_source
        from hf_mmsel.data.shards import ShardManifest

        if args.noise_ratio:
            raise ValueError("--noise_ratio injects noise into a map-style dataset; shard input is read as is")
        source = resolve_shard_source(args.dataset)
        try:
            manifest = ShardManifest.load_or_build(source, args.manifest_path)
        except OSError:  # shards in a read-only folder: keep their manifest with the outputs
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            manifest = ShardManifest.load_or_build(source, Path(args.output_dir) / "input_manifest.json")
        return ShardedSource(manifest)
    from hf_mmsel.data import inject_noisy_correspondence, load_image_text_dataset

    ds = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                 label_column=args.label_column, split=args.split, max_samples=args.max_samples)
    if args.noise_ratio:
        ds = inject_noisy_correspondence(ds, args.noise_ratio, seed=args.noise_seed,
                                         label_column="label" if "label" in ds.column_names else None)
    if len(ds) < 2:
        raise ValueError(f"need at least 2 pairs to curate, split {args.split!r} has {len(ds)}")
    clash = [c for c in SCORE_COLUMNS if c in ds.column_names]
    if clash:
        raise ValueError(f"the dataset already has score column(s) {clash}; curate the source dataset instead")
    return MapStyleSource(ds, args.samples_per_shard)


def scoring_config(args: CurateArguments, settings, source, model, max_length: int, image_size) -> dict[str, Any]:
    """What the score files depend on (written to ``curation_config.json``; a mismatch refuses to resume)."""
    return {
        "model": model_fingerprint(model), "max_length": max_length, "image_size": list(image_size),
        "source": source.fingerprint, "source_kind": source.kind, "num_samples": source.num_samples,
        "source_files": (input_files_fingerprint([s.path for s in source.manifest.shards])
                         if hasattr(source, "manifest") else None),
        "training_state_sha256": training_state_sha256(args.training_state), "scoring": asdict(settings),
        "noise_ratio": args.noise_ratio, "noise_seed": args.noise_seed if args.noise_ratio else None,
    }


def _legacy_pair(state: dict[str, Any], name: str, other: str) -> dict[str, Any]:
    """``name`` (and ``other``, same hook prefix) of a hf_mmsel <= 0.1 state file (no index of hook kinds)."""
    prefixes = sorted(sorted(k[: -len(name)] for k in state if k == name or k.endswith("." + name)),
                      key=lambda p: p + other not in state)  # prefixes holding both first
    return {n: state[prefixes[0] + n] for n in (name, other) if prefixes and prefixes[0] + n in state}


def read_training_state(path: str, num_rows: int) -> dict[str, Any]:
    """DISSect bank (``hist``/``seen``) and GSC weights from a ContrastiveTrainer checkpoint.

    A checkpoint folder holds the sharded per-sample state, read by hook kind (the ``selection`` hook's
    ``bank.hist``/``bank.seen``, the ``gsc`` hook's or GSC+ network 0's ``buffers.weight``) through
    :func:`hf_mmsel.state.checkpoint.read_hook_state`; a ``selection_state.safetensors`` file (checkpoints of
    hf_mmsel <= 0.1) is read as is. Raises when the state holds neither or was written for a different number of
    samples."""
    from safetensors.torch import load_file

    from hf_mmsel.state.checkpoint import HOOK_STATE_DIR, INDEX_NAME, read_hook_state

    file = Path(path)
    if file.is_dir() and (file / HOOK_STATE_DIR / INDEX_NAME).is_file():
        plus = read_hook_state(file, "gsc_plus") or {}
        bank = read_hook_state(file, "selection") or {}
        buffers = read_hook_state(file, "gsc") or {k[5:]: v for k, v in plus.items() if k.startswith("net0.")}
        keys = sorted({**bank, **buffers})
    else:
        if file.is_dir():
            file = file / STATE_FILE_NAME
        if not file.is_file():
            raise FileNotFoundError(
                f"--training_state: {str(path)!r} holds neither {HOOK_STATE_DIR}/{INDEX_NAME} (a ContrastiveTrainer "
                f"checkpoint folder) nor {STATE_FILE_NAME}")
        state = load_file(str(file))
        bank, keys = _legacy_pair(state, "bank.hist", "bank.seen"), sorted(state)
        buffers = _legacy_pair(state, "buffers.weight", "buffers.num_updates")
    out: dict[str, Any] = {}
    if "bank.hist" in bank and "bank.seen" in bank:
        out.update(dissect_hist=bank["bank.hist"].float(), dissect_seen=bank["bank.seen"].bool(),
                   dissect_key="bank.hist")
    if "buffers.weight" in buffers:
        updates = buffers.get("buffers.num_updates")
        out["gsc_weight"], out["gsc_key"] = buffers["buffers.weight"].float(), "buffers.weight"
        out["gsc_num_updates"] = int(updates) if updates is not None else None
    if "dissect_hist" not in out and "gsc_weight" not in out:
        raise ValueError(
            f"{str(file)!r} holds no DISSect score bank (selection: bank.hist/bank.seen) and no GSC buffers "
            f"(gsc: buffers.weight); keys: {keys[:12]}"
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


# ---------------------------------------------------------------------------------------- card / Hub
def _source_name(args: CurateArguments) -> str:
    base = args.dataset or "embedded easy-vqa captions (hf_mmsel.data)"
    extra = "" if _is_shard_input(args) else f", split {args.split}"
    if args.max_samples:
        extra += f", first {args.max_samples} rows"
    if args.noise_ratio:
        extra += f", {args.noise_ratio:.0%} NCR-shuffled captions (seed {args.noise_seed})"
    return base + extra


def build_card(args: CurateArguments, stats: dict[str, Any], card_data=None):
    from hf_mmsel.hub import dataset_card_data, render_card

    if card_data is None:
        is_hub_id = args.dataset is not None and not Path(args.dataset).exists() and "*" not in args.dataset
        card_data = dataset_card_data(tags=["image-text", "noisy-correspondence", "gsc"],
                                      source_datasets=[args.dataset] if is_hub_id else None)
    settings = {"model": args.model_name_or_path, "selected by": args.select_by, **stats.get("selection", {}),
                "curation_score": f"mean pool quantile of {args.curation_score_components}",
                "negCLIPLoss": f"K={args.neg_clip_batches} seeded batches of {args.neg_clip_batch_size} pairs",
                "GSC anchors": f"{stats['num_anchors']} (seeded draw over the pool, seed {args.seed}; anchors.safetensors)",
                "profiles": f"{args.structure_similarity}, t={args.structure_temperature}, centred={args.structure_centered}",
                "p chunk size": args.chunk_size, "p as GMM posterior": args.prob_posterior,
                "mixture fitted on": f"{stats['mixture_fit_pairs']} pairs of {len(stats['mixture_fit_shards'])} seeded shards",
                "logit scale": round(stats["logit_scale"], 3), "training state": args.training_state or "none",
                "bad samples skipped": stats["bad_samples"]}
    columns = {name: COLUMN_DOCS[name] for name in SCORE_COLUMNS if name in stats["score_columns"]}
    return render_card(
        "curated_dataset_card", card_data=card_data,
        dataset_id=args.hub_dataset_id or Path(args.output_dir).name,
        source_dataset=_source_name(args), method="gsc" + (" + dissect" if "dissect_score" in columns else ""),
        settings=settings, num_source=stats["num_source"], num_kept=stats.get("num_kept"),
        estimated_noise_rate=stats["estimated_noise_rate"], score_column=args.select_by,
        histogram_image=HISTOGRAM_NAME, score_columns=columns, detection=stats.get("detection_auroc"),
    )


def push(curated, args: CurateArguments, token: str, stats: dict[str, Any], out: Path) -> None:
    """The curated subset (``Dataset.push_to_hub``, or the curated shards under ``data/``), then the card
    (keeping the YAML datasets wrote), histogram and statistics."""
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    from hf_mmsel.hub import dataset_card_data

    repo_id = args.hub_dataset_id
    api = HfApi(token=token)
    if curated is not None:
        curated.push_to_hub(repo_id, split=args.split, token=token, private=args.hub_private,
                            commit_message="Upload dataset curated with hf_mmsel")
    else:
        api.create_repo(repo_id, repo_type="dataset", private=args.hub_private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(out / CURATED_DIR),
                          path_in_repo="data", allow_patterns=["*.tar", "*.parquet"],
                          commit_message="Upload shards curated with hf_mmsel")
    try:  # datasets' README carries configs/dataset_info: merge our metadata into it
        pushed = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
    except Exception:  # noqa: BLE001 - a missing README only loses the dataset_info block
        pushed = {}
    ours = build_card(args, stats).data.to_dict()
    merged = {**pushed, **{k: v for k, v in ours.items() if v is not None}}
    card = build_card(args, stats, card_data=dataset_card_data(**merged))
    api.create_commit(
        repo_id, repo_type="dataset", commit_message="Add curation card, score histogram and statistics",
        operations=[CommitOperationAdd("README.md", str(card).encode()),
                    CommitOperationAdd(HISTOGRAM_NAME, str(out / HISTOGRAM_NAME)),
                    CommitOperationAdd(STATS_NAME, str(out / STATS_NAME))],
    )


# ------------------------------------------------------------------------------------------------ main
def finish(args: CurateArguments, scorer, source, out: Path, logit_scale: float, token: str | None) -> dict[str, Any]:
    """Process 0, after every shard is scored: statistics, histogram, card, curated subset, push."""
    from hf_mmsel.curation import read_scores
    from hf_mmsel.curation.pipeline import SCORES_MANIFEST_NAME

    manifest = json.loads((out / SCORES_MANIFEST_NAME).read_text())
    scores = read_scores(out, source)
    present = [c for c in SCORE_COLUMNS if c in scores]
    if args.select_by not in scores:
        raise ValueError(f"--select_by {args.select_by} needs a --training_state with GSC buffers")
    clean_prob = scores["gsc_clean_prob"]
    noise = scorer.mixture.noise_estimate()
    if not noise["reliable"]:
        separation = "n/a" if noise["separation"] is None else f"{noise['separation']:.2f}"
        warnings.warn(
            f"curate: the {noise['score']} scores show no distinct noisy mode (separation {separation} < "
            f"{MIN_SEPARATION:g}), so the estimated noise rate "
            f"({noise['rate'] if noise['rate'] is not None else float('nan'):.2f}) is unreliable: either the pool is "
            "(nearly) clean or the curating model is too weak to tell clean from noisy pairs (train it longer, or "
            "with --gsc true). The ranking columns are still usable for --keep_fraction.", stacklevel=2)
    stats: dict[str, Any] = {
        "num_source": source.num_samples, "num_scored": int(clean_prob.size), "bad_samples": manifest["bad_samples"],
        "bad_sample_examples": manifest["bad_sample_examples"], "num_shards": len(source.shards),
        "input": source.kind, "num_anchors": int(scorer.anchors.sample_idx.numel()),
        "mixture_fit_shards": scorer.mixture.fit_shards,
        "mixture_fit_pairs": int(scorer.mixture.consistency.num_fit or 0),
        "estimated_noise_rate": noise["rate"] if noise["rate"] is not None else float("nan"),
        "noise_estimate": noise,
        "logit_scale": logit_scale, "score_columns": present,
        "score_means": {k: float(np.nanmean(scores[k])) for k in present + ["positive_prob", "consistency"]
                        if k in scores and scores[k].size},
        "args": asdict(args) | {"hub_token": None, "show_progress": None, "dataloader_num_workers": None},
    }
    is_noisy = scores.get("is_noisy")
    if is_noisy is not None:
        stats["true_noise_rate"] = float(is_noisy.mean())
        stats["detection_auroc"] = detection_aurocs({k: scores[k] for k in present}, is_noisy)
    curated = None
    if args.threshold is not None or args.keep_fraction is not None:
        keep, selection = select_rows(scores[args.select_by], args.keep_fraction, args.threshold)
        if keep.size == 0:
            raise ValueError(
                f"no pair has {args.select_by} >= {selection['threshold']} "
                f"(max {np.nanmax(scores[args.select_by]):.3f}); lower --threshold or use --keep_fraction"
            )
        stats.update(num_kept=int(keep.size), selection=selection)
        if is_noisy is not None:
            stats["kept_noise_rate"] = float(is_noisy[keep].mean())
        curated = write_curated_subset(source, scores, keep, out)
    plot_histograms({k: scores[k] for k in present}, is_noisy, stats.get("detection_auroc", {}), out / HISTOGRAM_NAME)
    (out / STATS_NAME).write_text(json.dumps(stats, indent=2, default=str) + "\n")
    build_card(args, stats).save(str(out / "README.md"))
    if args.push_to_hub:
        push(curated, args, token, stats, out)
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    validate_args(args)
    token = resolve_token(args)  # before any work

    import torch
    from accelerate import PartialState

    from hf_mmsel.curation import CurationScorer, ScoringSettings
    from hf_mmsel.curation.model_loading import load_embedder, load_scoring_model
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.models import logit_scale_of
    from hf_mmsel.recipes.run_utils import print_run_summary

    state = PartialState(cpu=args.use_cpu)
    if args.engine == "ray" and state.num_processes > 1:
        raise ValueError("--engine ray runs from one driver process; do not start it with accelerate launch")
    with state.main_process_first():  # first the data: a wrong --caption_column fails before the model loads
        source = load_source(args, is_main_process=state.is_main_process)
    model, tokenizer, transform, max_length = load_scoring_model(
        args.model_name_or_path, image_size=args.image_size, max_length=args.max_length, image_mean=args.image_mean,
        image_std=args.image_std)
    model.to(state.device).eval()
    training_state = read_training_state(args.training_state, source.num_samples) if args.training_state else {}
    if args.select_by == "gsc_weight" and "gsc_weight" not in training_state:
        raise ValueError("--select_by gsc_weight needs a --training_state with GSC buffers")
    settings = ScoringSettings.from_arguments(args)
    out = Path(args.output_dir)
    config = scoring_config(args, settings, source, model, max_length, transform.size)
    mode = prepare_curation_dir(out, config, args.overwrite_output_dir) if state.is_main_process else None
    state.wait_for_everyone()
    logit_scale = float(logit_scale_of(model).detach().cpu())
    collator = ImageTextCollator(tokenizer, image_transform=transform, max_length=max_length)
    scorer = CurationScorer(out, source, settings, logit_scale=logit_scale, training_state=training_state, model=model,
                            collate_fn=collator, device=state.device, rank=state.process_index,
                            world_size=state.num_processes, barrier=state.wait_for_everyone,
                            num_workers=args.dataloader_num_workers, show_progress=args.show_progress)
    start = time.perf_counter()
    if args.engine == "ray":
        import ray

        from hf_mmsel.curation.ray_engine import run_ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
        factory = functools.partial(load_embedder, args.model_name_or_path, args.image_size, args.max_length,
                                    args.use_cpu)
        run_ray(scorer, embedder_factory=factory, num_actors=args.ray_num_actors,
                num_gpus_per_actor=args.ray_num_gpus_per_actor)
    else:
        with torch.no_grad():
            scorer.run()
    seconds = time.perf_counter() - start
    stats: dict[str, Any] = {"world_size": state.num_processes}
    if state.is_main_process:
        stats.update(finish(args, scorer, source, out, logit_scale, token))
        stats.update(seconds=round(seconds, 3), mode=mode, engine=args.engine,
                     pairs_embedded_by_process_0=scorer.scored_pairs)
        metrics = {"pairs": stats["num_scored"], "bad samples": stats["bad_samples"], "kept": stats.get("num_kept", "-"),
                   "estimated noise rate": stats["estimated_noise_rate"], "processes": state.num_processes,
                   "engine": args.engine, "scoring seconds": round(seconds, 2), "run": mode}
        if not stats["noise_estimate"]["reliable"]:
            metrics["estimated noise rate"] = f"{stats['estimated_noise_rate']:.4f} (unreliable: no noisy mode)"
        if "detection_auroc" in stats:
            metrics["AUROC gsc_clean_prob"] = stats["detection_auroc"]["gsc_clean_prob"]
            metrics["AUROC curation_score"] = stats["detection_auroc"]["curation_score"]
        artefacts = {"scores": str(out / "scores"), "statistics": str(out / STATS_NAME),
                     "histogram": str(out / HISTOGRAM_NAME), "card": str(out / "README.md")}
        if (out / CURATED_DIR).exists():
            artefacts["curated subset"] = str(out / CURATED_DIR)
        if args.push_to_hub:
            artefacts["hub"] = f"https://huggingface.co/datasets/{args.hub_dataset_id}"
        hint = ("import pandas as pd; scores = pd.read_parquet('" + str(out / "scores") + "')")
        if (out / CURATED_DIR).exists():
            hint += ("\nfrom datasets import load_from_disk; curated = load_from_disk('" + str(out / CURATED_DIR) + "')"
                     if source.kind == "map" else
                     "\nload_image_text_dataset('" + str(out / CURATED_DIR) + "', streaming=True)")
        print_run_summary("curate", metrics, artefacts, hint)
    state.wait_for_everyone()
    return stats


if __name__ == "__main__":  # through the dispatcher: its checks before any import, one-line errors
    import sys

    from hf_mmsel.cli import main as cli_main

    sys.exit(cli_main(["curate", *sys.argv[1:]]))
