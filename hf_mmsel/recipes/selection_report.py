"""Reports of ``benchmark-selection``: runs aggregated over seeds, ``results.json``, ``results.md``,
``results.png``, ``time_to_quality.png`` and (with ``--log_curves``) ``curves.png``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .benchmark_strategies import parse_strategy

_AVERAGED = ("i2t_r1", "t2i_r1", "rsum", "class_i2t_r1", "class_t2i_r1", "class_rsum", "best_val_test_rsum",
             "best_val_test_class_rsum", "best_val_cpu_seconds", "best_val_epoch", "zero_shot_acc", "train_seconds",
             "train_cpu_seconds",
             "selected_noisy_fraction",
             "selected_noisy_fraction_after_warmup", "similarity_auroc", "detection_auroc", "reference_epochs",
             "reference_seconds", "reference_cpu_seconds", "reference_rsum", "val_rsum", "best_val_rsum",
             "full_best_val_rsum", "curation_auroc", "curation_similarity_auroc", "curation_estimated_noise_rate")
_REACHED = ("time_to_full_best_cpu_seconds", "time_to_full_best_ratio")  # None in a seed that never reaches it


def aggregate_runs(runs: list[dict[str, Any]], noise_ratio: float, seeds: list[int]) -> dict[str, Any]:
    """Mean over seeds (of the seeds with a value). ``time_to_full_best_*`` is the mean over every seed when each
    reached full's best validation rSum, else ``None`` (``time_to_full_best_reached`` counts the seeds that did)."""
    row: dict[str, Any] = {"strategy": runs[0]["strategy"], "loss_type": runs[0].get("loss_type", "softmax"),
                           "select_rate": runs[0]["select_rate"], "noise_ratio": noise_ratio,
                           "score_source": runs[0].get("score_source"), "in_sampler": runs[0].get("in_sampler")}
    for key in _AVERAGED:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
    reached = [r for r in runs if r.get("time_to_full_best_cpu_seconds") is not None]
    for key in _REACHED:
        row[key] = statistics.fmean(r[key] for r in runs) if reached and len(reached) == len(runs) else None
    row["time_to_full_best_reached"] = len(reached)
    for key in ("rsum", "class_rsum", "best_val_test_rsum"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
    row["seeds"] = seeds
    row["per_seed"] = runs
    return row


def row_label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The row's strategy, with its loss type when the rows mix loss types (plot legends)."""
    mixed = len({r.get("loss_type", "softmax") for r in rows}) > 1
    return f"{row['strategy']} ({row.get('loss_type', 'softmax')})" if mixed else row["strategy"]


def format_number(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_reports(results: list[dict[str, Any]], out: Path, args) -> None:
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))

    fmt = format_number
    lines = ["Retrieval is pair level (the hit is the pair's own caption / image; identical caption texts count as one "
             "caption); `class` columns count any caption of the same class. `best val`: early stopping, the test "
             "rSum at the run's best validation evaluation and the train CPU seconds spent until then.", "",
             "| noise | loss | strategy | rate | i2t R@1 | t2i R@1 | test rSum, final (± std) | class rSum, final "
             "| test rSum at best val (± std) | train CPU s to best val | zero-shot | train s "
             "| sel. noisy | sim. AUROC | det. AUROC | train CPU s | best val rSum | CPU s to full's best val (x full) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        reached = r.get("time_to_full_best_cpu_seconds")
        to_best = (f"{fmt(reached)} ({fmt(r.get('time_to_full_best_ratio'), 2)}x)" if reached is not None else
                   f"never in {len(r['seeds']) - r.get('time_to_full_best_reached', 0)} of {len(r['seeds'])} seeds"
                   if r.get("full_best_val_rsum") is not None else "n/a")
        lines.append(
            f"| {r['noise_ratio']:.0%} | {r.get('loss_type', 'softmax')} | {r['strategy']} | {r['select_rate']:.2f} | "
            f"{fmt(r['i2t_r1'])} | "
            f"{fmt(r['t2i_r1'])} | {fmt(r['rsum'])} ± {fmt(r['rsum_std'])} | {fmt(r.get('class_rsum'))} | "
            f"{fmt(r.get('best_val_test_rsum'))} ± {fmt(r.get('best_val_test_rsum_std'))} | "
            f"{fmt(r.get('best_val_cpu_seconds'))} | {fmt(r['zero_shot_acc'], 3)} | "
            f"{fmt(r['train_seconds'])} | {fmt(r['selected_noisy_fraction'], 3)} | {fmt(r['similarity_auroc'], 3)} | "
            f"{fmt(r['detection_auroc'], 3)} | {fmt(r.get('train_cpu_seconds'))} | {fmt(r.get('best_val_rsum'))} | "
            f"{to_best} |"
        )
    refs = [r for r in results if r.get("reference_seconds") is not None]
    if refs:
        lines.append("")
        oracle = [parse_strategy(r["strategy"])[0] == "reference_clipscore" for r in refs]
        lines.extend(
            f"{r['noise_ratio']:.0%} noise, {r['strategy']}: train s includes the fixed reference model (full data, "
            f"{r['reference_epochs']:.0f} epochs" + (", then one scoring pass" if is_oracle else
                                                      "; its forward on every candidate batch is in the run") +
            f"): {fmt(r['reference_seconds'])} s ({fmt(r['reference_cpu_seconds'])} CPU s); reference model test "
            f"rSum {fmt(r['reference_rsum'])}; det. AUROC = AUROC of "
            + ("its scores over all training pairs." if is_oracle else "the run's own criterion (last visit).")
            for r, is_oracle in zip(refs, oracle)
        )
    curated = [r for r in results if r.get("curation_auroc") is not None]
    if curated:
        lines.append("")
        lines.extend(f"{r['noise_ratio']:.0%} noise, {r['strategy']}: one-pass curation (recipes/curate.py, default "
                     f"config) by the final model: gsc_clean_prob AUROC {fmt(r['curation_auroc'], 3)}, its cosine "
                     f"{fmt(r['curation_similarity_auroc'], 3)}, estimated noise rate "
                     f"{fmt(r['curation_estimated_noise_rate'], 3)}." for r in curated)
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise_ratio"] for r in results})
    strategies = list(dict.fromkeys(row_label(r, results) for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        rows = [next((r for r in results if row_label(r, results) == strategy and r["noise_ratio"] == n), None)
                for n in noises]
        xs = [j + i * width for j, r in enumerate(rows) if r is not None]
        kept = [r for r in rows if r is not None]
        axes[0].bar(xs, [r["rsum"] for r in kept], width, yerr=[r["rsum_std"] for r in kept], label=strategy)
        axes[1].bar(xs, [r["train_seconds"] for r in kept], width, label=strategy)
    seeds = results[0].get("seeds", []) if results else []
    labels = (("test rSum (mean ± std over seeds)", "rSum (sum of R@1/5/10, both directions, %)"),
              ("training time, scoring included", "train seconds (wall clock)"))
    for ax, (title, ylabel) in zip(axes, labels):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(noises))], [f"{n:.0%} noise" for n in noises])
        ax.set_title(title)
        ax.set_xlabel("injected noisy-correspondence rate")
        ax.set_ylabel(ylabel)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="strategy")
    fig.suptitle(f"benchmark-selection: {len(strategies)} strategies, seeds {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    _plot_curves(results, out, plt)


def _mean_curve(row: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(time ``key``, validation rSum) averaged over the row's seeds point by point (same eval steps per seed)."""
    curves = [[c for c in run["curve"] if "val_rsum" in c] for run in row["per_seed"] if run.get("curve")]
    n = min((len(c) for c in curves), default=0)
    return ([statistics.fmean(c[i][key] for c in curves) for i in range(n)],
            [statistics.fmean(c[i]["val_rsum"] for c in curves) for i in range(n)])


def _plot_curves(results: list[dict[str, Any]], out: Path, plt) -> None:
    """``time_to_quality.png``: per noise level, validation rSum against train CPU time and wall time (mean over
    seeds), one line per strategy, with full's best validation rSum dashed. ``curves.png`` (``--log_curves``): the
    clean - noisy train cosine gap per epoch."""
    rows = [r for r in results if any(c.get("val_rsum") is not None for run in r["per_seed"] for c in
                                      run.get("curve") or [])]
    noises = sorted({r["noise_ratio"] for r in rows})
    if rows:
        fig, axes = plt.subplots(len(noises), 2, figsize=(12, 4.2 * len(noises)), squeeze=False)
        for n, noise in enumerate(noises):
            for col, (key, xlabel) in enumerate((("train_cpu_seconds", "train CPU seconds"),
                                                 ("train_seconds", "train wall seconds"))):
                ax = axes[n][col]
                for r in (r for r in rows if r["noise_ratio"] == noise):
                    xs, ys = _mean_curve(r, key)
                    ax.plot(xs, ys, marker=".", label=row_label(r, rows))
                best = [r["full_best_val_rsum"] for r in rows if r["noise_ratio"] == noise
                        and r.get("full_best_val_rsum") is not None]
                if best:
                    ax.axhline(best[0], color="grey", linestyle="--", linewidth=1, label="full's best (mean)")
                ax.set_title(f"{noise:.0%} noise: validation rSum vs {xlabel}")
                ax.set_xlabel(xlabel + " (scoring and reference cost included)")
                ax.set_ylabel("validation rSum")
        axes[0][1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "time_to_quality.png", dpi=90)
        plt.close(fig)
    rows = [r for r in results if r["per_seed"] and (r["per_seed"][0].get("curve") or [{}])[0].get("clean_cos")
            is not None]
    if not rows:
        return
    noises = sorted({r["noise_ratio"] for r in rows})
    fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4), squeeze=False)
    for col, noise in enumerate(noises):
        for r in (r for r in rows if r["noise_ratio"] == noise):
            curves = [run["curve"] for run in r["per_seed"]]
            epochs = [c["epoch"] for c in curves[0]]
            gap = [statistics.fmean(c[i]["clean_cos"] - c[i]["noisy_cos"] for c in curves) for i in range(len(epochs))]
            axes[0][col].plot(epochs, gap, label=row_label(r, rows))
        axes[0][col].set_title(f"{noise:.0%} noise: train cosine, clean mean - noisy mean")
        axes[0][col].set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
