"""Compare MoLA with fine-tuning baselines on the embedded heterogeneous benchmark, under identical budgets.

    hf-mmsel benchmark-mola --methods mola_grad,lora_shared --seeds 0,1,2 --learning_rates 1e-3,3e-3
    # the defaults (the 6 methods without xlora): 36 runs of 600 steps; the 30 runs without poly took 1154 s on 2
    # shared CPU cores

Methods (same frozen random-init ViT base, same number of optimisation steps, batch size, linear schedule, warm-up and
seeds; the base and the MoLA configs are those of ``recipes/train_mola.py``):

* ``full``            full fine-tuning of backbone + per-task heads (hard parameter sharing);
* ``lora_shared``     one LoRA of rank ``r * T`` on every backbone Linear: the trainable budget of MoLA's T experts;
* ``lora_per_task``   one rank-``r`` LoRA per task, each trained alone on its task for ``max_steps / T`` steps;
* ``mola_grad``       MoLA-Grad: T rank-``r`` experts, expert t trained only by task-t samples of mixed batches;
* ``mola_router``     MoLA-Router: the same experts mixed by a learned router + TwD loss (no task id for routing);
* ``poly``            peft's Poly (Polytropon): ``T`` rank-``r`` LoRA skills per layer mixed by learned per-task weights
                      (MoLA-Grad's budget plus a ``T x T`` routing table per layer; ``hf_mmsel.mola.peft_mixtures``).

* ``xlora``           peft's X-LoRA (opt-in, not in the default list: two training stages). Stage 1 is
                      ``lora_per_task`` (same seed and learning rate; reused when both methods run), each task's LoRA
                      saved as a peft adapter of the ViT backbone. Stage 2 builds peft's ``XLoraModel`` over the T
                      adapters on the same frozen backbone and trains its scaling classifier (peft defaults: one
                      Linear ``d -> T`` on the last hidden state, softmax, per-token scalings shared by all layers)
                      and the per-task heads (initialised from stage 1's; ``--xlora_trainable_adapters`` also trains
                      the adapters, frozen by default as in peft) for ``--max_steps`` steps on mixed batches. Task ids
                      only pick the head; X-LoRA itself never sees them (a learned router). Each step runs X-LoRA's
                      two passes over the token layers (scalings without adapters, then the scaled adapters); the
                      frozen patch embedding runs once, outside (``hf_mmsel.mola.peft_mixtures`` says why peft's
                      X-LoRA needs this ``inputs_embeds`` root on a ViT). Charged with both stages: its
                      ``train_steps`` and ``train_time_s`` add stage 1's, its trainable budget is stage 1's (T
                      adapters + heads, MoLA-Grad's) plus the scaling classifier, ``(d + 1) T``. Its step time is
                      that of stage 2; the learning rate (both stages) is chosen on validation like the others'.

Model selection never looks at the test split (the official MoLA code selects on test): a validation split
(``--val_fraction`` of every task's training examples, fixed by ``--split_seed``) is carved from ``train``; every
method is trained on the rest with each learning rate of ``--learning_rates`` and each seed, and its learning rate
is the one with the best validation mean accuracy averaged over the seeds. The table reports the test accuracy at
that learning rate (mean and std over seeds). Step times are medians of training steps of all methods measured
interleaved in one loop (same batch size, after the accuracy runs), so CPU load changes hit all methods alike; the
MoLA-Grad / LoRA step ratio of ``recipes/benchmark_mola_step.py`` is recorded too.

Writes ``results.json`` (every run), ``results.md`` (tables) and ``results.png`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from hf_mmsel.recipes.run_utils import parse_bool

METHODS = ("full", "lora_shared", "lora_per_task", "mola_grad", "mola_router", "poly", "xlora")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "xlora")  # xlora trains per-task LoRAs first: opt-in


def _number_list(kind):
    """argparse type for ``1e-3,3e-3`` or ``1e-3 3e-3`` (each token may hold a comma-separated list)."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from err

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", type=_number_list(str), default=[list(DEFAULT_METHODS)],
                   help=f"comma-separated, from {','.join(METHODS)} (default: all but xlora)")
    p.add_argument("--seeds", nargs="+", type=_number_list(int), default=[[0, 1, 2]], help="e.g. 0,1,2")
    p.add_argument("--learning_rates", nargs="+", type=_number_list(float), default=[[1e-3, 3e-3]],
                   help="grid searched per method on the validation split, e.g. 1e-3,3e-3")
    p.add_argument("--max_steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--r", type=int, default=8, help="rank of each MoLA expert / per-task LoRA")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--max_per_task", type=int, default=None)
    p.add_argument("--xlora_trainable_adapters", type=parse_bool, nargs="?", const=True, default=False,
                   help="xlora: also train the per-task LoRA adapters in stage 2 (default: frozen, peft's default)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of each task's train examples held out")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--timing_steps", type=int, default=30, help="interleaved timed steps per method (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the most stable step times)")
    p.add_argument("--output_dir", default="outputs/benchmark-mola")
    p.add_argument("--overwrite_output_dir", type=parse_bool, nargs="?", const=True, default=False,
                   help="write into a non-empty --output_dir, replacing only the files this run writes")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(m for group in args.methods for m in group))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    args.seeds = [s for group in args.seeds for s in group]
    args.learning_rates = [lr for group in args.learning_rates for lr in group]
    if not args.seeds or not args.learning_rates:
        p.error("--seeds and --learning_rates need at least one value")
    if not 0.0 < args.val_fraction < 1.0:
        p.error(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    return args


# ------------------------------------------------------------------------------------------------ models
def build_model(method: str, spec, args, seed: int):
    """The model of ``method`` (``lora_per_task``: one task's model), on the train_mola recipe's base."""
    from peft import LoraConfig, get_peft_model
    from hf_mmsel.recipes.train_mola import ModelArguments, build_base_model, mola_config

    from hf_mmsel.models.multitask import HEADS_MODULE_NAME, vit_target_modules

    T, r = spec.num_tasks, args.r
    model_args = ModelArguments(
        routing="router" if method == "mola_router" else "task", r=r, lora_alpha=2 * r,
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, intermediate_size=2 * args.hidden_size,
        model_seed=seed,
    )
    base = build_base_model(model_args, spec, image_size=28)
    heads = [HEADS_MODULE_NAME]
    if method == "full":
        return base
    if method in ("lora_shared", "lora_per_task"):
        rank = r * T if method == "lora_shared" else r
        return get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=vit_target_modules(base),
                                               modules_to_save=heads))
    if method in ("mola_grad", "mola_router"):
        return get_peft_model(base, mola_config(model_args, spec, base))
    if method == "poly":
        from hf_mmsel.mola.peft_mixtures import poly_config, route_poly_by_task_ids

        model = get_peft_model(base, poly_config(T, r, vit_target_modules(base), modules_to_save=heads))
        route_poly_by_task_ids(model)
        return model
    if method == "xlora":
        raise ValueError("build_model: xlora is built from trained per-task LoRAs; use build_xlora_model")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def build_xlora_model(per_task_models: list, spec, args, seed: int, adapter_dir: str):
    """peft's X-LoRA over the backbone LoRAs of ``per_task_models`` (``lora_per_task`` models, task t's at index t,
    saved as peft adapters under ``adapter_dir``) on the same frozen base, with per-task heads initialised from each
    task's own model."""
    import torch

    from hf_mmsel.models.multitask import MultiTaskClassifier
    from hf_mmsel.mola.peft_mixtures import XLoraVisionBackbone, save_lora_adapter

    if len(per_task_models) != spec.num_tasks:
        raise ValueError(f"build_xlora_model: {len(per_task_models)} per-task models for {spec.num_tasks} tasks")
    folders = [save_lora_adapter(m, os.path.join(adapter_dir, f"task{t}"), submodule="backbone")
               for t, m in enumerate(per_task_models)]
    base = build_model("full", spec, args, seed)  # the frozen random-init base the per-task LoRAs were trained on
    backbone = XLoraVisionBackbone(base.backbone, folders, trainable_adapters=args.xlora_trainable_adapters)
    model = MultiTaskClassifier(backbone, spec, feature_dim=base.feature_dim, pooling=base.pooling)
    with torch.no_grad():
        for t, task_model in enumerate(per_task_models):
            heads = task_model.base_model.model.heads.modules_to_save["default"]
            model.heads.weight[t].copy_(heads.weight[t])
            model.heads.bias[t].copy_(heads.bias[t])
    return model


def _xlora_classifier_params(model) -> int:
    from hf_mmsel.mola.peft_mixtures import xlora_scaling_classifier

    return sum(p.numel() for p in xlora_scaling_classifier(model.backbone.xlora).parameters())


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _single_task_trainable(model, spec, task: int) -> int:
    """Trainable parameters a one-task model needs: the adapter plus task ``task``'s head only."""
    heads = model.base_model.model.heads.modules_to_save["default"]
    own_head = (heads.feature_dim + 1) * spec.num_labels[task]
    return _trainable(model) - heads.weight.numel() - heads.bias.numel() + own_head


# ------------------------------------------------------------------------------------------------ training
def _train(model, train_ds, eval_sets: dict, steps: int, lr: float, args, seed: int, out: str, task_names):
    from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

    training_args = MolaTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=min(args.warmup_steps, steps // 10), weight_decay=0.0, logging_steps=max(steps // 4, 1),
        eval_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
    )
    trainer = MolaTrainer(model=model, args=training_args, train_dataset=train_ds, task_names=task_names)
    trainer.train()
    return {split: trainer.evaluate(ds, metric_key_prefix=split) for split, ds in eval_sets.items()}


def _by_task(dataset, task: int):
    import numpy as np

    tasks = np.asarray(dataset.with_format("numpy")["task_id"][:])
    return dataset.select(np.flatnonzero(tasks == task))


SPLITS = ("validation", "test")


def train_per_task_loras(data, spec, args, seed: int, lr: float) -> dict:
    """``lora_per_task`` (also X-LoRA's stage 1): one rank-``r`` LoRA per task, each trained alone on its task for
    ``max_steps / T`` steps. Returns the trained ``models``, per-split ``accuracy``, ``trainable_params``,
    ``train_steps`` and ``train_time_s``."""
    out = os.path.join(args.output_dir, "runs", f"lora_per_task_lr{lr:g}_seed{seed}")
    acc: dict[str, dict[str, float]] = {split: {} for split in SPLITS}
    models, trainable, steps = [], 0, args.max_steps // spec.num_tasks
    start = time.perf_counter()
    for t, name in enumerate(spec.task_names):
        model = build_model("lora_per_task", spec, args, seed)
        trainable += _single_task_trainable(model, spec, t)
        metrics = _train(model, _by_task(data["train"], t), {s: _by_task(data[s], t) for s in SPLITS},
                         steps, lr, args, seed, out, spec.task_names)
        for split in SPLITS:
            acc[split][name] = metrics[split][f"{split}_acc_{name}"]
        models.append(model)
    return {"models": models, "accuracy": acc, "trainable_params": trainable, "train_steps": steps * spec.num_tasks,
            "train_time_s": time.perf_counter() - start}


def run_method(method: str, data, spec, args, seed: int, lr: float, per_task_cache: dict | None = None) -> dict:
    """Train ``method`` on ``data["train"]`` with ``lr`` and ``seed``; accuracies on ``validation`` and ``test``.

    ``per_task_cache`` (a dict): the per-task LoRAs of ``(seed, lr)``, trained once for ``lora_per_task`` and
    ``xlora`` (deterministic: the same runs either way)."""
    out = os.path.join(args.output_dir, "runs", f"{method}_lr{lr:g}_seed{seed}")
    acc: dict[str, dict[str, float]] = {split: {} for split in SPLITS}
    if method in ("lora_per_task", "xlora"):
        cache = per_task_cache if per_task_cache is not None else {}
        if (seed, lr) not in cache:
            cache[(seed, lr)] = train_per_task_loras(data, spec, args, seed, lr)
        stage = cache[(seed, lr)]
    if method == "lora_per_task":
        acc, trainable = stage["accuracy"], stage["trainable_params"]
        steps, seconds = stage["train_steps"], stage["train_time_s"]
    else:
        start = time.perf_counter()
        if method == "xlora":
            model = build_xlora_model(stage["models"], spec, args, seed, os.path.join(out, "adapters"))
            trainable = stage["trainable_params"] + _xlora_classifier_params(model)
        else:
            model = build_model(method, spec, args, seed)
            trainable = _trainable(model)
        metrics = _train(model, data["train"], {s: data[s] for s in SPLITS}, args.max_steps, lr, args, seed, out,
                         spec.task_names)
        for split in SPLITS:
            acc[split] = {name: metrics[split][f"{split}_acc_{name}"] for name in spec.task_names}
        steps, seconds = args.max_steps, time.perf_counter() - start
        if method == "xlora":  # charged with its stage 1
            steps, seconds = steps + stage["train_steps"], seconds + stage["train_time_s"]
    return {
        "method": method, "seed": seed, "learning_rate": lr, "trainable_params": trainable,
        "train_steps": steps, "train_time_s": seconds,
        "val_accuracy": acc["validation"], "val_mean_acc": statistics.mean(acc["validation"].values()),
        "test_accuracy": acc["test"], "test_mean_acc": statistics.mean(acc["test"].values()),
    }


# ------------------------------------------------------------------------------------------------ step times
def measure_step_times(methods, data, spec, args) -> dict[str, float]:
    """Median seconds of one training step (forward, multi-task loss [+ TwD], backward, AdamW) per method, all
    methods timed interleaved on the same batch size; ``lora_per_task`` steps one task's rank-r LoRA, ``xlora`` its
    stage 2 (both passes; over untrained per-task LoRAs, which cost the same)."""
    import tempfile

    import torch
    from hf_mmsel.recipes.benchmark_mola_step import interleaved_median_step_times

    from hf_mmsel.data.multitask import MultiTaskCollator

    import numpy as np

    collate = MultiTaskCollator()
    rng = np.random.default_rng(0)

    def random_batch(dataset):  # a random (mixed-task) batch, as the Trainer's shuffled sampler draws them
        idx = rng.choice(len(dataset), args.batch_size, replace=len(dataset) < args.batch_size)
        return collate([dataset[int(i)] for i in idx])

    mixed, single = random_batch(data["train"]), random_batch(_by_task(data["train"], 0))
    step_fns = {}
    adapter_dir = tempfile.TemporaryDirectory()
    for method in methods:
        if method == "xlora":
            per_task = [build_model("lora_per_task", spec, args, seed=0) for _ in range(spec.num_tasks)]
            model = build_xlora_model(per_task, spec, args, 0, adapter_dir.name)
        else:
            model = build_model(method, spec, args, seed=0)
        model.train()
        batch = single if method == "lora_per_task" else mixed
        tuner = getattr(model, "base_model", None)
        uses_router = method == "mola_router"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, batch=batch, tuner=tuner, uses_router=uses_router, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if uses_router:
                loss = loss + tuner.mola_aux_loss(batch["task_ids"])
            loss.backward()
            optimizer.step()

        step_fns[method] = step
    try:
        return interleaved_median_step_times(step_fns, steps=args.timing_steps, warmup=3)
    finally:
        adapter_dir.cleanup()


# ------------------------------------------------------------------------------------------------ reporting
def select_learning_rates(runs: list[dict], methods) -> dict[str, float]:
    """Per method, the learning rate with the best validation mean accuracy averaged over seeds (ties: smaller lr)."""
    chosen = {}
    for method in methods:
        by_lr: dict[float, list[float]] = {}
        for run in runs:
            if run["method"] == method:
                by_lr.setdefault(run["learning_rate"], []).append(run["val_mean_acc"])
        chosen[method] = max(sorted(by_lr), key=lambda lr: statistics.mean(by_lr[lr]))
    return chosen


def summarise(runs: list[dict], methods, spec, chosen: dict[str, float]) -> dict[str, dict]:
    summary = {}
    for method in methods:
        selected = sorted((r for r in runs if r["method"] == method and r["learning_rate"] == chosen[method]),
                          key=lambda r: r["seed"])
        test_means = [r["test_mean_acc"] for r in selected]
        grid = {}
        for run in runs:
            if run["method"] == method:
                grid.setdefault(run["learning_rate"], []).append(run["val_mean_acc"])
        summary[method] = {
            "learning_rate": chosen[method],
            "val_mean_acc_by_lr": {f"{lr:g}": statistics.mean(v) for lr, v in sorted(grid.items())},
            "accuracy": {n: statistics.mean(r["test_accuracy"][n] for r in selected) for n in spec.task_names},
            "mean_acc": statistics.mean(test_means),
            "mean_acc_std": statistics.stdev(test_means) if len(test_means) > 1 else 0.0,
            "mean_acc_per_seed": {r["seed"]: r["test_mean_acc"] for r in selected},
            "trainable_params": selected[0]["trainable_params"],
            "train_steps": selected[0]["train_steps"],
            "train_time_s": statistics.mean(r["train_time_s"] for r in selected),
        }
    return summary


def write_markdown(payload: dict, spec, args, path: str) -> None:
    summary, step_ms = payload["summary"], payload.get("median_step_time_ms", {})
    n_seeds = len(args.seeds)
    lines = [
        f"MoLA benchmark: {args.max_steps} steps, batch {args.batch_size}, linear schedule, expert rank {args.r}, "
        f"seeds {args.seeds}; frozen random-init ViT {args.num_hidden_layers}x{args.hidden_size}. Learning rate per "
        f"method chosen from {args.learning_rates} by validation mean accuracy ({args.val_fraction:g} of each task's "
        f"train split, averaged over seeds); test accuracy at that learning rate"
        + (f", mean ± std over {n_seeds} seeds." if n_seeds > 1 else "."),
        "",
        "| method | lr | " + " | ".join(spec.task_names) + " | mean test acc | trainable params | step time (ms) |",
        "|" + "---|" * (len(spec.task_names) + 5),
    ]
    for method, s in summary.items():
        accs = " | ".join(f"{s['accuracy'][n]:.3f}" for n in spec.task_names)
        std = f" ± {s['mean_acc_std']:.3f}" if n_seeds > 1 else ""
        step = f"{step_ms[method]:.1f}" if method in step_ms else "n/a"
        lines.append(f"| {method} | {s['learning_rate']:g} | {accs} | **{s['mean_acc']:.3f}**{std} | "
                     f"{s['trainable_params']:,} | {step} |")
    lrs = [f"{lr:g}" for lr in args.learning_rates]
    lines += ["", "Validation mean accuracy (mean over seeds) per learning rate, used for the selection:", "",
              "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
    for method, s in summary.items():
        lines.append(f"| {method} | " + " | ".join(f"{s['val_mean_acc_by_lr'][lr]:.3f}" for lr in lrs) + " |")
    if "xlora" in summary:
        x = summary["xlora"]
        lines += ["", f"xlora is charged with its two stages: {x['train_steps']} steps ({x['train_steps'] - args.max_steps} "
                  f"of per-task LoRAs, then {args.max_steps} of X-LoRA, adapters "
                  f"{'trained' if args.xlora_trainable_adapters else 'frozen'}), {x['train_time_s']:.0f} s of training "
                  "per run; its step time is stage 2's (two passes)."]
    if "mola_grad" in summary and "lora_shared" in summary:
        g, l = summary["mola_grad"], summary["lora_shared"]
        diffs = [g["mean_acc_per_seed"][s] - l["mean_acc_per_seed"][s] for s in args.seeds]
        lines += ["", "MoLA-Grad − shared LoRA (same trainable budget), test mean accuracy per seed: "
                  + ", ".join(f"{d:+.3f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.3f})."]
    ratio = payload.get("step_benchmark")
    if ratio:
        lines += ["", f"`benchmark_mola_step.py` ({ratio['num_layers']} Linear {ratio['dim']}, batch "
                  f"{ratio['batch_size']}, r={ratio['rank']}, {ratio['num_experts']} experts, {ratio['device']}): "
                  f"MoLA-Grad / LoRA step time = {ratio['ratio_mola_grad_over_lora']:.2f}x."]
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(summary: dict, spec, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(spec.task_names) + ["mean"]
    x = np.arange(len(labels))
    width = 0.8 / max(len(summary), 1)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (method, s) in enumerate(summary.items()):
        values = [s["accuracy"][n] for n in spec.task_names] + [s["mean_acc"]]
        errors = [0.0] * len(spec.task_names) + [s["mean_acc_std"]]
        ax.bar(x + (i - (len(summary) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
               label=f"{method} (lr {s['learning_rate']:g})")
    ax.set_xticks(x, labels)
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method")
    ax.set_title("MoLA vs baselines (identical budgets, lr chosen on validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from hf_mmsel.data.multitask import load_multitask_benchmark, split_by_task

    benchmark, spec = load_multitask_benchmark(max_per_task=args.max_per_task)
    train, validation = split_by_task(benchmark["train"], args.val_fraction, seed=args.split_seed)
    data = {"train": train, "validation": validation, "test": benchmark["test"]}
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)
    started = time.perf_counter()
    runs: list[dict] = []
    for seed in args.seeds:  # methods interleaved within each (seed, lr) round
        for lr in args.learning_rates:
            per_task_cache: dict = {}  # lora_per_task's LoRAs, xlora's stage 1
            for method in args.methods:
                start = time.perf_counter()
                run = run_method(method, data, spec, args, seed, lr, per_task_cache)
                runs.append(run)
                print(f"[benchmark] seed {seed} lr {lr:g} {method}: val {run['val_mean_acc']:.4f} "
                      f"test {run['test_mean_acc']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    chosen = select_learning_rates(runs, args.methods)
    payload = {
        "settings": vars(args), "task_names": spec.task_names, "num_labels": spec.num_labels,
        "split_sizes": {k: len(v) for k, v in data.items()},
        "summary": summarise(runs, args.methods, spec, chosen), "runs": runs,
    }
    if args.timing_steps > 0:
        step_s = measure_step_times(args.methods, data, spec, args)
        payload["median_step_time_ms"] = {m: 1000 * s for m, s in step_s.items()}
        from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_step

        payload["step_benchmark"] = benchmark_mola_step(steps=args.timing_steps)
    payload["wall_time_s"] = time.perf_counter() - started
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    write_markdown(payload, spec, args, os.path.join(args.output_dir, "results.md"))
    write_plot(payload["summary"], spec, os.path.join(args.output_dir, "results.png"))
    print(Path(args.output_dir, "results.md").read_text())
    metrics = {}
    for method, row in payload["summary"].items():
        metrics[f"{method}: mean test acc"] = f"{row['mean_acc']:.3f} ± {row['mean_acc_std']:.3f}"
        metrics[f"{method}: lr"] = row["learning_rate"]
    out = Path(args.output_dir)
    print_run_summary(f"benchmark-mola: {len(args.methods)} methods x {len(args.seeds)} seed(s)", metrics,
                      {"table": out / "results.md", "all runs": out / "results.json", "bar chart": out / "results.png"},
                      load_hint=f"import json; json.load(open({str(out / 'results.json')!r}))['summary']")
    return payload


if __name__ == "__main__":
    main()
