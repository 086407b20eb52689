"""DataComp-style downstream curation benchmark: curate a noisy pool, train a fresh model on what is kept.

The noisy pool is ``benchmark-selection``'s (embedded easy-vqa or ``--dataset digits``; ``--noise_ratio`` of the
training captions shuffled, default 0.4; a clean validation split carved from train before the noise; test only
reported). Per seed a curating model scores it: ``--curator`` (a ``benchmark-selection`` strategy, default ``gsc``,
trained on the pool with that benchmark's regime; with GSC its final training state gives ``gsc_weight``), ``--curator
heldout`` (``full`` on the clean pairs ``--curator_holdout_fraction`` sets aside before the noise: a curator never
trained on the pool, the offline stand-in for a pretrained CLIP; the pool is the rest for every ``--curator``, so
both kinds score the same pool) or ``--curator_model PATH`` (a trained dual encoder folder). Each
``--curation_settings`` variant (``name=flag:value,...;...``, ``hf-mmsel curate`` flags) runs ``recipes/curate.py``;
the ``--scores`` columns of its ``scores/*.parquet`` (joined on ``sample_idx``) are the curation scores:
``similarity`` (the CLIP-score baseline, variant-independent) and ``<variant>/<column>`` (e.g.
``uncentred/gsc_clean_prob``), plus the ``--baselines`` ``random`` (seeded) and ``none`` (the whole pool, f = 1).

For every score and ``--keep_fractions`` f the top round(f N) pairs (ties: lower ``sample_idx`` first) train a FRESH
dual encoder (the seed's ``build_model`` init, the same for every score) with ``full`` for ``--epochs`` epochs of the
kept set: the optimizer step count depends on f only. A score that keeps exactly the pairs of an earlier one (e.g.
``curation_score``, a monotone map of ``neg_clip_loss`` by default) reuses that run (``same_kept_as``). Reported per
seed and as mean ± std: final ``val_rsum``, early stopping on the validation curve (``best_val_rsum``;
``best_val_test_rsum``: test rSum there), final test ``rsum`` (pair level), ``class_rsum``, ``train_cpu_seconds``,
and two diagnostics that read the injected noise labels: ``kept_noisy_fraction`` and the score's ``detection_auroc``
(clean = positive).

Choices (curation defaults, f, the curator) must be made on the validation columns (``best_val_rsum``,
``val_rsum``), never on ``detection_auroc`` / ``kept_noisy_fraction`` (a real pool has no noise labels); test
columns are only reported.

    hf-mmsel benchmark-downstream --noise_ratio 0.4 --seeds 0,1,2 --curator gsc --keep_fractions 0.3,0.5,0.7 \\
        --curation_settings "default=;uncentred=structure_centered:false"

Data, model and training flags are ``benchmark-selection``'s (``--epochs``, ``--batch_size``, ...; its
``--strategies``, ``--curate``, ``--log_curves`` are unused). Writes ``results.json``, ``results.md``, ``pools/``,
``curators/`` and ``curation/`` to ``--output_dir`` (default ``outputs/benchmark-downstream``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_mmsel.data.in_memory import InMemoryPairs
from hf_mmsel.recipes import benchmark_selection as selection_bench
from hf_mmsel.recipes.benchmark_data import build_model, curation_pool, load_splits, parse_csv
from hf_mmsel.recipes.benchmark_selection import REFERENCE_STRATEGIES, BenchmarkArguments, train_reference, train_run
from hf_mmsel.recipes.benchmark_strategies import parse_strategy, run_options
from hf_mmsel.recipes.selection_report import format_number

PROG = "hf-mmsel benchmark-downstream"
BASELINES = ("random", "none")
#: curate's score columns a variant can rank by (``gsc_weight``: a curator trained with GSC, whose final training
#: state curate reads with ``--training_state``)
SCORE_COLUMNS = ("similarity", "neg_clip_loss", "curation_score", "gsc_clean_prob", "positive_prob", "consistency",
                 "structure_posterior", "gsc_weight")
#: ``--curator`` value: a model trained with ``full`` on clean held-out pairs that are not in the pool
HELDOUT_CURATOR = "heldout"
#: curate flags the benchmark sets itself (a --curation_settings variant may not)
RESERVED_CURATE_FLAGS = ("model_name_or_path", "dataset", "output_dir", "overwrite_output_dir", "use_cpu",
                         "show_progress", "keep_fraction", "threshold", "select_by", "noise_ratio", "noise_seed",
                         "max_samples", "split", "streaming", "manifest_path", "training_state", "engine",
                         "push_to_hub", "hub_dataset_id", "hub_token", "hub_private", "image_column",
                         "caption_column", "label_column", "ray_address", "ray_num_actors", "ray_num_gpus_per_actor")
METRICS = ("val_rsum", "best_val_rsum", "rsum", "class_rsum", "best_val_test_rsum", "kept_noisy_fraction",
           "detection_auroc", "train_cpu_seconds")


@dataclass
class DownstreamArguments(BenchmarkArguments):
    noise_ratio: float = field(default=0.4, metadata={"help": "fraction of training captions shuffled"})
    seeds: str | None = field(default="0,1,2", metadata={"help": "comma list of seeds (noise, init, curator)"})
    output_dir: str = field(default="outputs/benchmark-downstream")
    curator: str = field(default="gsc", metadata={"help": "benchmark-selection strategy that trains the curating "
                                                          "model on the noisy pool (gsc, full, dissect+gsc, ...), or "
                                                          f"'{HELDOUT_CURATOR}': `full` on the clean held-out pairs of "
                                                          "--curator_holdout_fraction, never on the pool"})
    curator_holdout_fraction: float = field(
        default=0.0, metadata={"help": "fraction of the clean training split set aside (seed 0, before the noise) "
                                       "for the held-out curator; the pool is the rest, for every --curator"})
    curator_model: str | None = field(default=None, metadata={"help": "a trained dual encoder folder to curate "
                                                                      "with instead of training --curator"})
    curation_settings: str = field(
        default="default=", metadata={"help": "';'-separated curate variants, each name=flag:value,flag:value "
                                              "(e.g. 'default=;uncentred=structure_centered:false')"})
    scores: str = field(default="similarity,neg_clip_loss,gsc_clean_prob,curation_score",
                        metadata={"help": f"comma list of curate score columns, from {list(SCORE_COLUMNS)}"})
    baselines: str = field(default="random,none", metadata={"help": "comma list: random (seeded), none (f = 1)"})
    keep_fractions: str = field(default="0.3,0.5,0.7", metadata={"help": "comma list of kept fractions f in (0, 1]"})


def parse_curation_settings(text: str) -> dict[str, list[str]]:
    """``"default=;uncentred=structure_centered:false"`` -> ``{"default": [], "uncentred":
    ["--structure_centered", "false"]}``; a clear ``ValueError`` on anything malformed."""
    from hf_mmsel.recipes.curate import CurateArguments

    allowed = sorted({f.name for f in fields(CurateArguments)} - set(RESERVED_CURATE_FLAGS))
    variants: dict[str, list[str]] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        name, sep, body = (s.strip() for s in part.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"--curation_settings: bad variant {part!r}; write name=flag:value,flag:value (name: "
                             f"letters, digits, _ . + -; 'default=' for curate's defaults)")
        if name in variants:
            raise ValueError(f"--curation_settings: variant {name!r} is given twice")
        flags: list[str] = []
        for item in (i.strip() for i in body.split(",") if i.strip()):
            flag, sep, value = (s.strip() for s in item.partition(":"))
            if not sep or not value or flag not in allowed:
                raise ValueError(f"--curation_settings {name!r}: bad item {item!r}; write flag:value with flag one "
                                 f"of {allowed}")
            flags += [f"--{flag}", value]
        variants[name] = flags
    if not variants:
        raise ValueError("--curation_settings is empty; give at least one variant, e.g. 'default='")
    return variants


def _check_variant_values(variants: dict[str, list[str]]) -> None:
    """Let curate's own parser and checks judge the values before any training (a typo must not cost a run)."""
    from hf_mmsel.recipes import curate

    for name, flags in variants.items():
        try:
            curate.validate_args(curate.parse_args(["--model_name_or_path", "<curator>", *flags]))
        except (SystemExit, ValueError) as err:  # argparse printed what is wrong; curate's checks say it
            raise ValueError(f"--curation_settings {name!r}: curate rejects {flags}: {err}") from err


def top_fraction(values: np.ndarray, fraction: float) -> np.ndarray:
    """Positions (= ``sample_idx``, ascending) of the round(f N) highest values; ties: lower index first, NaN last."""
    k = max(1, int(round(fraction * values.size)))
    ranked = np.lexsort((np.arange(values.size), -np.nan_to_num(values.astype(np.float64), nan=-np.inf)))
    return np.sort(ranked[:k])


def read_scores(folder: Path, n: int) -> dict[str, np.ndarray]:
    """The columns of curate's ``scores/*.parquet``, indexed by ``sample_idx`` (every pair 0..n-1 must be there)."""
    import pandas as pd

    table = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]).set_index("sample_idx")
    table = table.sort_index()
    if not np.array_equal(table.index.to_numpy(), np.arange(n)):
        raise RuntimeError(f"{folder}: curate scored {len(table)} of the {n} pairs (bad samples?)")
    return {c: table[c].to_numpy() for c in table.columns}


def _train_curator(args, noisy, heldout, class_captions, captions, seed: int, folder: Path
                   ) -> tuple[Path, bool, dict[str, Any]]:
    """Train ``--curator`` on the noisy pool (``benchmark-selection``'s regime; ``heldout``: ``full`` on the clean
    held-out pairs instead) and save it, tokenizer and image processor included, for curate (as ``_curate_run``
    does), with its final training state when it trained with GSC. ``--curator_model`` is used as is.
    Returns ``(model folder, has training state, info)``."""
    if args.curator_model:
        return Path(args.curator_model), False, {"curator": args.curator_model}
    model_dir = folder / "final_model"
    bundle = build_model(args, captions, seed)
    if args.curator == HELDOUT_CURATOR:
        row = train_run(args, "full", bundle, {**noisy, "train": heldout}, class_captions, seed, folder,
                        loss_type=args.loss_type)
        with_state = False
    else:
        name, options = run_options(args.curator)
        run_args = replace(args, **options)
        selection, with_state = parse_strategy(name)
        reference = None
        if selection in REFERENCE_STRATEGIES:
            reference = train_reference(run_args, build_model(args, captions, seed), noisy, class_captions, seed,
                                         folder / "reference", loss_type=args.loss_type)
        row = train_run(run_args, args.curator, bundle, noisy, class_captions, seed, folder, reference=reference,
                        loss_type=args.loss_type, save_state_to=model_dir if with_state else None)
    bundle.model.save_pretrained(str(model_dir))  # the Trainer trained this very object in place (CPU, unwrapped)
    bundle.tokenizer.save_pretrained(str(model_dir))
    bundle.image_transform.to_image_processor().save_pretrained(str(model_dir))
    keys = ("rsum", "class_rsum", "best_val_rsum", "best_val_test_rsum", "train_cpu_seconds", "detection_auroc",
            "similarity_auroc")
    return model_dir, with_state, {"curator": args.curator, **{k: row.get(k) for k in keys}}


def _curation_scores(variants, columns, model_dir: Path, with_state: bool, pool: Path, folder: Path,
                     is_noisy: np.ndarray, info: dict[str, Any]) -> dict[str, tuple[str | None, np.ndarray]]:
    """score name -> (variant, per-pair values): ``similarity`` once (prefixed only where a variant changes it),
    every other column as ``<variant>/<column>``."""
    from hf_mmsel.recipes import curate

    scores: dict[str, tuple[str | None, np.ndarray]] = {}
    for name, flags in variants.items():
        stats = curate.main(["--model_name_or_path", str(model_dir), "--dataset", str(pool), "--use_cpu", "true",
                             "--output_dir", str(folder / name), "--overwrite_output_dir", "true",
                             "--show_progress", "false",
                             *(["--training_state", str(model_dir)] if with_state else []), *flags])
        info.setdefault("curation", {})[name] = {k: stats.get(k) for k in ("detection_auroc", "estimated_noise_rate",
                                                                            "seconds")}
        table = read_scores(folder / name / "scores", is_noisy.size)
        if "is_noisy" in table and not np.array_equal(table["is_noisy"].astype(bool), is_noisy):
            raise RuntimeError(f"{folder / name}: the scored pool's noise differs from the training split's")
        for column in columns:
            if column not in table:
                raise ValueError(f"--scores {column}: curate wrote no such column (gsc_weight needs a curator "
                                 "trained with GSC)")
            values = table[column].astype(np.float64)
            if column == "similarity" and ("similarity" not in scores or
                                           np.allclose(scores["similarity"][1], values, equal_nan=True)):
                scores.setdefault("similarity", (None, values))
            elif not any(key.endswith(f"/{column}") and np.array_equal(v, values, equal_nan=True)
                         for key, (_, v) in scores.items()):  # a column no variant changed is trained on once
                scores[f"{name}/{column}"] = (name, values)
    return scores


def _train_kept(args, cached, noisy_train, kept: np.ndarray, class_captions, captions, seed, folder) -> dict:
    """A fresh model (the seed's ``build_model`` init) trained with ``full`` on the kept pairs only."""
    from hf_mmsel.data import add_sample_idx

    data = {**cached, "train": InMemoryPairs(add_sample_idx(noisy_train.select(kept.tolist())))}
    row = train_run(args, "full", build_model(args, captions, seed), data, class_captions, seed, folder,
                     loss_type=args.loss_type)
    keys = ("val_rsum", "best_val_rsum", "best_val_test_rsum", "best_val_epoch", "rsum", "class_rsum",
            "optimizer_steps", "train_cpu_seconds", "train_seconds", "curve")
    return {k: row.get(k) for k in keys}


def _aggregate(runs: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    """One row per (noise, score, f): mean and std over seeds of :data:`METRICS`, the per-seed runs beside."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["noise_ratio"], run["score"], run["keep_fraction"]), []).append(run)
    rows = []
    for (noise, score, fraction), group in groups.items():
        row = {"dataset": args.dataset or "easy-vqa", "noise_ratio": noise, "curator": args.curator_model or
               args.curator, "variant": group[0]["variant"], "score": score, "keep_fraction": fraction,
               "num_kept": group[0]["num_kept"], "optimizer_steps": group[0]["optimizer_steps"],
               "seeds": [r["seed"] for r in group]}
        for key in METRICS:
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
        rows.append({**row, "per_seed": group})
    return rows


def _write_reports(out: Path, args, curators: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    (out / "results.json").write_text(json.dumps({"config": vars(args), "curators": curators, "results": rows},
                                                 indent=2, default=str))
    def pm(row: dict[str, Any], key: str) -> str:
        return f"{format_number(row[key])} ± {format_number(row[f'{key}_std'])}"

    lines = [f"Downstream curation benchmark ({rows[0]['dataset'] if rows else '-'}, curator "
             f"{args.curator_model or args.curator}, seeds {sorted({s for r in rows for s in r['seeds']})}): a fresh "
             "model trained with `full` on the top-f pairs by each score, the same steps for every score at one f. "
             "Retrieval is pair level (`class rSum`: any caption of the class). Choose on the validation columns "
             "(`best val rSum`, `val rSum`); `test` columns are only reported; `kept noisy` and `det. AUROC` read the "
             "injected noise labels and are diagnostics only.", ""]
    fractions = sorted({r["keep_fraction"] for r in rows})
    for noise in sorted({r["noise_ratio"] for r in rows}):
        subset = [r for r in rows if r["noise_ratio"] == noise]
        lines += [f"{noise:.0%} noise: best val rSum / test rSum at best val (mean over seeds)", "",
                  "| score | " + " | ".join(f"f = {f:g}" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for score in dict.fromkeys(r["score"] for r in subset):
            cells = {r["keep_fraction"]: f"{format_number(r['best_val_rsum'])} / {format_number(r['best_val_test_rsum'])}"
                     for r in subset if r["score"] == score}
            lines.append(f"| {score} | " + " | ".join(cells.get(f, "") for f in fractions) + " |")
        lines.append("")
    lines += ["| noise | score | f | kept | steps | val rSum, final | best val rSum | test rSum at best val | "
              "test rSum, final | class rSum | kept noisy | det. AUROC | train CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['noise_ratio']:.0%} | {r['score']} | {r['keep_fraction']:g} | {r['num_kept']} | "
              f"{r['optimizer_steps']} | {pm(r, 'val_rsum')} | {pm(r, 'best_val_rsum')} | "
              f"{pm(r, 'best_val_test_rsum')} | {pm(r, 'rsum')} | {pm(r, 'class_rsum')} | "
              f"{format_number(r['kept_noisy_fraction'], 3)} | {format_number(r['detection_auroc'], 3)} | "
              f"{format_number(r['train_cpu_seconds'])} |"
              for r in rows]
    lines += [""] + [f"Curator {c['curator']} ({c['noise_ratio']:.0%} noise, seed {c['seed']}): test rSum "
                     f"{format_number(c.get('rsum'))}, best val rSum {format_number(c.get('best_val_rsum'))}." for c in curators]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from hf_mmsel.cli import parse_args_with_config

    (args,) = parse_args_with_config(DownstreamArguments, argv, prog=PROG,
                                     help_sources=[__file__, selection_bench.__file__])
    from hf_mmsel.data import inject_noisy_correspondence, preprocess_image_text
    from hf_mmsel.metrics import auroc
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    torch.set_num_threads(args.threads)
    variants = parse_curation_settings(args.curation_settings)
    _check_variant_values(variants)
    columns, baselines = parse_csv(args.scores, str), parse_csv(args.baselines, str)
    fractions = parse_csv(args.keep_fractions, float)
    if not set(columns) <= set(SCORE_COLUMNS) or not set(baselines) <= set(BASELINES) or not columns + baselines:
        raise ValueError(f"--scores must be from {list(SCORE_COLUMNS)} and --baselines from {list(BASELINES)} "
                         f"(at least one in all), got {columns} and {baselines}")
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"--keep_fractions must be a comma list of values in (0, 1], got {args.keep_fractions!r}")
    if args.curator_model and not Path(args.curator_model).is_dir():
        raise FileNotFoundError(f"--curator_model {args.curator_model!r} is not a folder")
    if not 0.0 <= args.curator_holdout_fraction < 1.0:
        raise ValueError(f"--curator_holdout_fraction must lie in [0, 1), got {args.curator_holdout_fraction}")
    if args.curator == HELDOUT_CURATOR and not args.curator_holdout_fraction and not args.curator_model:
        raise ValueError(f"--curator {HELDOUT_CURATOR} trains on held-out pairs: give --curator_holdout_fraction "
                         "(e.g. 0.2)")
    if not args.curator_model and args.curator != HELDOUT_CURATOR:
        parse_strategy(args.curator)  # raises on an unknown strategy, listing the choices
    seeds = parse_csv(args.seeds, int) or [args.seed]
    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)

    data, class_captions = load_splits(args)
    if "validation" not in data:
        raise ValueError("no validation split (--validation_fraction 0?): choices are made on the validation split")
    captions = data["train"]["caption"]
    from datasets import DatasetDict

    data = DatasetDict(data)
    if args.curator_holdout_fraction:  # seed 0, before any noise: the same pool for every seed and --curator
        from hf_mmsel.data import add_sample_idx

        parts = data["train"].train_test_split(test_size=args.curator_holdout_fraction, seed=0)
        data["train"], data["heldout"] = add_sample_idx(parts["train"]), add_sample_idx(parts["test"])
    bundle = build_model(args, captions, seed=0)
    cached = dict(preprocess_image_text(data, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                        max_length=args.max_length))
    heldout = None
    if "heldout" in cached:  # clean by construction (carved before any noise)
        split = cached.pop("heldout")
        heldout = InMemoryPairs(split.add_column("is_noisy", [False] * len(split)))
    data.pop("heldout", None)
    curators: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for noise in parse_csv(args.noise_ratios, float) or [args.noise_ratio]:
        for seed in seeds:
            tag = f"noise{noise}_seed{seed}"
            noisy_train = inject_noisy_correspondence(cached["train"], noise, seed=seed)
            is_noisy = np.asarray(noisy_train["is_noisy"], dtype=bool)
            pool = curation_pool(data["train"], noisy_train, noise, seed, out / "pools" / tag)
            noisy = {**cached, "train": InMemoryPairs(noisy_train)}
            model_dir, with_state, info = _train_curator(args, noisy, heldout, class_captions, captions, seed,
                                                         out / "curators" / tag)
            info.update(seed=seed, noise_ratio=noise, pool_size=int(is_noisy.size),
                        heldout_size=len(heldout) if heldout is not None else 0)
            scores = _curation_scores(variants, columns, model_dir, with_state, pool, out / "curation" / tag,
                                      is_noisy, info)
            curators.append(info)
            if "random" in baselines:
                scores["random"] = (None, np.random.default_rng([seed, 7]).random(is_noisy.size))
            if "none" in baselines:
                scores["none"] = (None, np.zeros(is_noisy.size))
            trained: dict[tuple[int, ...], tuple[str, dict[str, Any]]] = {}  # kept set -> its (score, result)
            for score, (variant, values) in scores.items():
                for fraction in [1.0] if score == "none" else fractions:
                    kept = top_fraction(values, fraction)
                    detection = auroc(values, ~is_noisy) if score != "none" else math.nan
                    run = {"seed": seed, "noise_ratio": noise, "score": score, "variant": variant,
                           "keep_fraction": fraction, "num_kept": int(kept.size), "kept_sample_idx": kept.tolist(),
                           "kept_noisy_fraction": float(is_noisy[kept].mean()),
                           "detection_auroc": None if math.isnan(detection) else detection}
                    key = tuple(kept.tolist())
                    if key in trained:  # the same pairs train the same model (seeded): reuse, and say so
                        run.update(trained[key][1], same_kept_as=trained[key][0])
                    else:
                        result = _train_kept(args, cached, noisy_train, kept, class_captions, captions, seed,
                                             out / "runs" / f"{tag}_{score.replace('/', '_')}_f{fraction:g}")
                        trained[key] = (score, result)
                        run.update(result)
                    runs.append(run)
                    print(f"noise={noise} seed={seed} {score} f={fraction:g}: kept {kept.size} "
                          f"(noisy {run['kept_noisy_fraction']:.3f}) steps={run['optimizer_steps']} best_val="
                          f"{format_number(run['best_val_rsum'])} test@best={format_number(run['best_val_test_rsum'])} "
                          f"rsum={run['rsum']:.1f}", flush=True)
            rows = _aggregate(runs, args)
            _write_reports(out, args, curators, rows)
    summary = {f"{r['noise_ratio']:.0%} noise, {r['score']} @ f={r['keep_fraction']:g}":
               f"best val {format_number(r['best_val_rsum'])} | test at best val {format_number(r['best_val_test_rsum'])} ± "
               f"{format_number(r['best_val_test_rsum_std'])} | final test {format_number(r['rsum'])}" for r in rows}
    print_run_summary(f"benchmark-downstream: curator {args.curator_model or args.curator}, {len(seeds)} seed(s)",
                      summary, {"table": out / "results.md", "all runs": out / "results.json"},
                      load_hint=f"import json; json.load(open({str(out / 'results.json')!r}))['results']")
    return rows


if __name__ == "__main__":
    main()
