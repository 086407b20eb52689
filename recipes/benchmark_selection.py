"""Benchmark online selection strategies on a noisy image-caption dataset (DISSect vs baselines).

Every strategy gets the same model initialisation, the same candidate batches (same sampler seed) and the same
number of optimizer steps; strategies run alternately in one process (the order rotates with the seed) so that
machine load hits them alike. ``train_seconds`` is the Trainer's wall-clock training time, every scoring forward
included. Writes ``results.json``, ``results.md`` and ``results.png`` to ``--output_dir``.

    python recipes/benchmark_selection.py --strategies dissect,random,full --seeds 0,1,2 --output_dir out/bench

The model is a small random-init CLIP built from a config at low resolution (``--image_size``), trained on cached
``pixel_values``/``input_ids`` so that one 20-epoch run over ~6k pairs takes seconds to a minute on one CPU core.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class BenchmarkArguments:
    dataset: str | None = field(default=None, metadata={"help": "Hub id or local path (default: embedded easy-vqa)"})
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    label_column: str | None = field(default=None, metadata={"help": "optional class column (zero-shot accuracy)"})
    noise_ratio: float = field(default=0.4, metadata={"help": "fraction of training captions shuffled"})
    noise_ratios: str | None = field(default=None, metadata={"help": "comma list; overrides --noise_ratio"})
    strategies: str = field(default="dissect,random,full", metadata={"help": "comma list of strategies"})
    select_rate: float = field(default=0.5)
    epochs: int = field(default=20)
    selection_warmup_epochs: int | None = field(default=None, metadata={"help": "default: a quarter of --epochs"})
    seed: int = field(default=0)
    seeds: str | None = field(default=None, metadata={"help": "comma list, e.g. 0,1,2 (overrides --seed)"})
    output_dir: str = field(default="benchmark_selection")
    batch_size: int = field(default=128, metadata={"help": "candidate batch B"})
    learning_rate: float = field(default=2e-3)
    weight_decay: float = field(default=0.1)
    image_size: int = field(default=28)
    patch_size: int = field(default=7)
    hidden_size: int = field(default=64)
    num_layers: int = field(default=2)
    max_length: int = field(default=16)
    initializer_factor: float = field(
        default=4.0, metadata={"help": "CLIP init scale; the default 1.0 collapses a from-scratch tiny CLIP to ln B"}
    )
    logit_scale_init: float = field(default=10.0, metadata={"help": "initial exp(logit_scale) (CLIP: 1/0.07)"})
    max_train: int | None = field(default=None, metadata={"help": "use only the first n training pairs"})
    max_test: int | None = field(default=None)
    test_fraction: float = field(default=0.2, metadata={"help": "held-out share when the dataset has one split"})
    threads: int = field(default=1, metadata={"help": "torch threads (1 gives the steadiest timings)"})


class InMemoryPairs(torch.utils.data.Dataset):
    """The cached tensor columns of a ``datasets.Dataset`` held in memory: a row costs a few tensor indexings
    instead of an Arrow-to-tensor conversion of its image (which dominated the step time on CPU)."""

    COLUMNS = ("pixel_values", "input_ids", "attention_mask", "sample_idx", "label", "is_noisy")

    def __init__(self, dataset) -> None:
        names = [c for c in self.COLUMNS if c in dataset.column_names]
        table = dataset.with_format("torch", columns=names)[:]
        self.columns = {name: table[name] for name in names}
        self.length = len(dataset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices)
        block = {name: column[index] for name, column in self.columns.items()}
        return [{name: block[name][j] for name in block} for j in range(len(indices))]


def _csv(text: str | None, cast) -> list:
    return [cast(x) for x in text.split(",") if x.strip()] if text else []


def _load(args: BenchmarkArguments):
    from datasets import DatasetDict

    from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS, load_image_text_dataset

    dsd = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                  label_column=args.label_column)
    if "train" not in dsd:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(dsd)}")
    test_name = next((s for s in ("test", "validation", "val") if s in dsd), None)
    if test_name is None:
        parts = dsd["train"].train_test_split(test_size=args.test_fraction, seed=0)
        dsd = DatasetDict(train=parts["train"], test=parts["test"])
        test_name = "test"
    from hf_mmsel.data import add_sample_idx

    train, test = add_sample_idx(dsd["train"]), add_sample_idx(dsd[test_name])
    if args.max_train:
        train = train.select(range(min(args.max_train, len(train))))
    if args.max_test:
        test = test.select(range(min(args.max_test, len(test))))
    class_captions = None
    if "label" in train.column_names:
        if args.dataset is None:
            class_captions = list(EASY_VQA_CLASS_CAPTIONS)
        else:  # the most frequent caption of each class serves as its prompt
            from collections import Counter

            counts: dict[int, Counter] = {}
            for label, caption in zip(train["label"], train["caption"]):
                counts.setdefault(int(label), Counter())[caption] += 1
            if sorted(counts) == list(range(len(counts))):
                class_captions = [counts[i].most_common(1)[0][0] for i in range(len(counts))]
    return DatasetDict(train=train, test=test), class_captions


def _build(args: BenchmarkArguments, captions, seed: int):
    """A small CLIP from config (the tokenizer and image transform come from ``build_dual_encoder``)."""
    from transformers import CLIPConfig, CLIPModel

    from hf_mmsel.models import DualEncoderBundle, build_dual_encoder

    bundle = build_dual_encoder(captions=captions, image_size=args.image_size, patch_size=args.patch_size,
                                hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4,
                                projection_dim=32, max_length=args.max_length, seed=seed)
    config = CLIPConfig.from_dict({**bundle.model.config.to_dict(),
                                   "logit_scale_init_value": math.log(args.logit_scale_init)})
    for tower in (config, config.text_config, config.vision_config):
        tower.initializer_factor = args.initializer_factor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return DualEncoderBundle(model, bundle.tokenizer, bundle.image_transform)


def _train_one(args, strategy, bundle, data, class_captions, seed, out: Path) -> dict[str, Any]:
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.metrics import auroc, embed_dataset
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    targs = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=512,
        num_train_epochs=args.epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=0.05, lr_scheduler_type="cosine", logging_strategy="epoch", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        selection_strategy=strategy, select_rate=args.select_rate,
        selection_warmup_epochs=args.selection_warmup_epochs, plot_score_distributions=False,
        dataloader_num_workers=0,
    )
    collator = ImageTextCollator(bundle.tokenizer, max_length=args.max_length)
    trainer = ContrastiveTrainer(bundle.model, targs, train_dataset=data["train"], eval_dataset=data["test"],
                                 data_collator=collator, processing_class=bundle.tokenizer,
                                 class_captions=class_captions)
    output = trainer.train()
    train_seconds = float(output.metrics["train_runtime"])
    metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    noisy = [h["selected_noisy_fraction"] for h in logs if "selected_noisy_fraction" in h]
    warm = targs.resolved_selection_warmup_epochs
    late = [h["selected_noisy_fraction"] for h in logs if "selected_noisy_fraction" in h and h["epoch"] > warm]
    # AUROC of the final model's image-text cosine on the training pairs (clean = positive)
    from torch.utils.data import DataLoader

    emb = embed_dataset(trainer.model, DataLoader(data["train"], batch_size=512, collate_fn=collator))
    cos = (emb["image_embeds"] * emb["text_embeds"]).sum(-1)
    clean = ~emb["is_noisy"].bool()
    criterion, flags = trainer.selection_hook.clean_scores()
    known = torch.isfinite(criterion) & (flags >= 0)
    detection = auroc(criterion[known], flags[known] == 0) if bool(known.any()) else None
    return {
        "strategy": strategy, "select_rate": args.select_rate if strategy != "full" else 1.0,
        "i2t_r1": metrics["eval_i2t_r1"], "t2i_r1": metrics["eval_t2i_r1"], "rsum": metrics["eval_rsum"],
        "zero_shot_acc": metrics.get("eval_zero_shot_acc"), "train_seconds": train_seconds,
        "selected_noisy_fraction": statistics.fmean(noisy) if noisy and strategy != "full" else None,
        "selected_noisy_fraction_after_warmup": statistics.fmean(late) if late and strategy != "full" else None,
        "similarity_auroc": auroc(cos, clean),
        "detection_auroc": None if detection is None or math.isnan(detection) else detection,
        "optimizer_steps": trainer.state.global_step,
    }


_AVERAGED = ("i2t_r1", "t2i_r1", "rsum", "zero_shot_acc", "train_seconds", "selected_noisy_fraction",
             "selected_noisy_fraction_after_warmup", "similarity_auroc", "detection_auroc")


def _aggregate(runs: list[dict[str, Any]], noise_ratio: float, seeds: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"strategy": runs[0]["strategy"], "select_rate": runs[0]["select_rate"],
                           "noise_ratio": noise_ratio}
    for key in _AVERAGED:
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.fmean(values) if values else None
    rsums = [r["rsum"] for r in runs]
    row["rsum_std"] = statistics.stdev(rsums) if len(rsums) > 1 else 0.0
    row["seeds"] = seeds
    row["per_seed"] = runs
    return row


def _write_reports(results: list[dict[str, Any]], out: Path, args: BenchmarkArguments) -> None:
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))

    def fmt(v, digits=1):
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = ["| noise | strategy | rate | i2t R@1 | t2i R@1 | rSum (± std) | zero-shot | train s | sel. noisy "
             "| sim. AUROC | det. AUROC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['noise_ratio']:.0%} | {r['strategy']} | {r['select_rate']:.2f} | {fmt(r['i2t_r1'])} | "
            f"{fmt(r['t2i_r1'])} | {fmt(r['rsum'])} ± {fmt(r['rsum_std'])} | {fmt(r['zero_shot_acc'], 3)} | "
            f"{fmt(r['train_seconds'])} | {fmt(r['selected_noisy_fraction'], 3)} | {fmt(r['similarity_auroc'], 3)} | "
            f"{fmt(r['detection_auroc'], 3)} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise_ratio"] for r in results})
    strategies = list(dict.fromkeys(r["strategy"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        rows = [next((r for r in results if r["strategy"] == strategy and r["noise_ratio"] == n), None) for n in noises]
        xs = [j + i * width for j, r in enumerate(rows) if r is not None]
        kept = [r for r in rows if r is not None]
        axes[0].bar(xs, [r["rsum"] for r in kept], width, yerr=[r["rsum_std"] for r in kept], label=strategy)
        axes[1].bar(xs, [r["train_seconds"] for r in kept], width, label=strategy)
    for ax, title in zip(axes, ("test rSum (mean ± std over seeds)", "train seconds (scoring included)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(noises))], [f"{n:.0%} noise" for n in noises])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from transformers import HfArgumentParser

    from hf_mmsel.data import inject_noisy_correspondence, preprocess_image_text
    from hf_mmsel.selection import SELECTION_STRATEGIES

    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    strategies = _csv(args.strategies, str)
    unknown = [s for s in strategies if s not in SELECTION_STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(SELECTION_STRATEGIES)}")
    if not 0.0 < args.select_rate <= 1.0:
        raise ValueError(f"select_rate must be in (0, 1], got {args.select_rate}")
    seeds = _csv(args.seeds, int) or [args.seed]
    noise_ratios = _csv(args.noise_ratios, float) or [args.noise_ratio]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    data, class_captions = _load(args)
    tokenizer_bundle = _build(args, data["train"]["caption"], seed=0)
    t0 = time.perf_counter()
    cached = preprocess_image_text(data, tokenizer=tokenizer_bundle.tokenizer,
                                   image_transform=tokenizer_bundle.image_transform, max_length=args.max_length)
    print(f"cached {len(cached['train'])} train / {len(cached['test'])} test pairs in {time.perf_counter() - t0:.1f}s")

    results = []
    for noise in noise_ratios:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
        for n_seed, seed in enumerate(seeds):
            noisy = dict(cached)
            noisy["train"] = InMemoryPairs(inject_noisy_correspondence(cached["train"], noise, seed=seed))
            order = strategies[n_seed % len(strategies):] + strategies[: n_seed % len(strategies)]
            for strategy in order:  # alternate: the rotation spreads machine-load drift over strategies
                bundle = _build(args, data["train"]["caption"], seed=seed)  # identical init for every strategy
                row = _train_one(args, strategy, bundle, noisy, class_captions, seed,
                                 out / "runs" / f"noise{noise}_{strategy}_seed{seed}")
                runs[strategy].append({"seed": seed, **row})
                print(f"noise={noise} seed={seed} {strategy}: rsum={row['rsum']:.1f} "
                      f"train_s={row['train_seconds']:.1f} sel_noisy={row['selected_noisy_fraction']} "
                      f"det_auroc={row['detection_auroc']}", flush=True)
        results.extend(_aggregate(runs[s], noise, seeds) for s in strategies)
        _write_reports(results, out, args)
    return results


if __name__ == "__main__":
    main()
