"""Compare MoLA with fine-tuning baselines on the embedded heterogeneous benchmark, under identical budgets.

    python recipes/benchmark_mola.py                       # ~10 min on 2 CPU cores
    python recipes/benchmark_mola.py --seeds 0 1 2 --max_steps 2000 --output_dir outputs/mola_benchmark

Methods (same frozen random-init ViT base, same steps, batch size, learning rate, linear schedule and seed):

* ``full``            full fine-tuning of backbone + per-task heads (hard parameter sharing);
* ``lora_shared``     one LoRA of rank ``r * T`` on every backbone Linear: the trainable budget of MoLA's T experts;
* ``lora_per_task``   one rank-``r`` LoRA per task, each trained alone on its task for ``max_steps / T`` steps;
* ``mola_grad``       MoLA-Grad: T rank-``r`` experts, expert t trained only by task-t samples of mixed batches;
* ``mola_router``     MoLA-Router: the same experts mixed by a learned router + TwD loss (no task id for routing).

Every method has per-task heads (``modules_to_save``). Writes ``results.json``, ``results.md`` (table) and
``results.png`` (per-task accuracy per method) to ``--output_dir``: per-task and mean test accuracy (mean and std over
seeds), trainable parameters and median training step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

METHODS = ("full", "lora_shared", "lora_per_task", "mola_grad", "mola_router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--max_steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--r", type=int, default=8, help="rank of each MoLA expert / per-task LoRA")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--max_per_task", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the most stable step times)")
    p.add_argument("--output_dir", default="outputs/mola_benchmark")
    return p.parse_args(argv)


class StepTimer(TrainerCallback):
    """Records the wall time of every optimisation step."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _train(model, train_ds, eval_ds, steps: int, args, seed: int, out: str, task_names):
    from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

    training_args = MolaTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512, learning_rate=args.learning_rate, lr_scheduler_type="linear",
        warmup_steps=min(args.warmup_steps, steps // 10), weight_decay=0.0, logging_steps=max(steps // 4, 1),
        eval_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = MolaTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                          task_names=task_names, callbacks=[timer])
    trainer.train()
    metrics = trainer.evaluate()
    return metrics, timer.times


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_method(method: str, data, spec, args, seed: int) -> dict:
    import numpy as np
    from peft import LoraConfig, get_peft_model

    from hf_mmsel import MolaConfig
    from hf_mmsel.models.multitask import HEADS_MODULE_NAME, build_multitask_vit, vit_target_modules

    def base():
        return build_multitask_vit(spec, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                   intermediate_size=2 * args.hidden_size, seed=seed)

    T, r = spec.num_tasks, args.r
    out = os.path.join(args.output_dir, "runs", f"{method}_seed{seed}")
    heads = [HEADS_MODULE_NAME]
    if method == "lora_per_task":
        accs, times, trainable = {}, [], 0
        train_tasks = np.asarray(data["train"].with_format("numpy")["task_id"][:])
        test_tasks = np.asarray(data["test"].with_format("numpy")["task_id"][:])
        for t, name in enumerate(spec.task_names):
            model = base()
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=vit_target_modules(model),
                                                     modules_to_save=heads))
            # only task t's head is used; count the parameters a single-task model needs
            trainable += _trainable(model) - model.base_model.model.heads.modules_to_save["default"].weight.numel() \
                - model.base_model.model.heads.modules_to_save["default"].bias.numel() \
                + (model.base_model.model.feature_dim + 1) * spec.num_labels[t]
            train_t = data["train"].select((train_tasks == t).nonzero()[0])
            test_t = data["test"].select((test_tasks == t).nonzero()[0])
            metrics, step_times = _train(model, train_t, test_t, args.max_steps // T, args, seed, out, spec.task_names)
            accs[name] = metrics[f"eval_acc_{name}"]
            times += step_times
        return {"accuracy": accs, "trainable_params": trainable, "step_time_s": statistics.median(times)}

    model = base()
    if method == "full":
        pass
    elif method == "lora_shared":
        model = get_peft_model(model, LoraConfig(r=r * T, lora_alpha=2 * r * T, target_modules=vit_target_modules(model),
                                                 modules_to_save=heads))
    elif method in ("mola_grad", "mola_router"):
        router = dict(routing="router", router_input="module:backbone.embeddings", twd_weight=0.1) \
            if method == "mola_router" else dict(routing="task")
        model = get_peft_model(model, MolaConfig(r=r, lora_alpha=2 * r, num_experts=T, target_modules=vit_target_modules(model),
                                                 modules_to_save=heads, task_names=list(spec.task_names), **router))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    trainable = _trainable(model)
    metrics, step_times = _train(model, data["train"], data["test"], args.max_steps, args, seed, out, spec.task_names)
    accs = {name: metrics[f"eval_acc_{name}"] for name in spec.task_names}
    return {"accuracy": accs, "trainable_params": trainable, "step_time_s": statistics.median(step_times)}


def summarise(runs: dict[str, list[dict]], spec) -> dict[str, dict]:
    summary = {}
    for method, results in runs.items():
        per_task = {name: [r["accuracy"][name] for r in results] for name in spec.task_names}
        means = [statistics.mean(r["accuracy"].values()) for r in results]
        summary[method] = {
            "accuracy": {name: statistics.mean(v) for name, v in per_task.items()},
            "mean_acc": statistics.mean(means),
            "mean_acc_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "mean_acc_per_seed": means,
            "trainable_params": results[0]["trainable_params"],
            "median_step_time_ms": 1000 * statistics.median(r["step_time_s"] for r in results),
        }
    return summary


def write_markdown(summary: dict, spec, args, path: str) -> None:
    header = "| method | " + " | ".join(spec.task_names) + " | mean acc | trainable params | step time (ms) |"
    lines = [
        f"MoLA benchmark: {args.max_steps} steps, batch {args.batch_size}, lr {args.learning_rate} (linear), "
        f"expert rank {args.r}, seeds {args.seeds}; frozen random-init ViT {args.num_hidden_layers}x{args.hidden_size}.",
        "",
        header,
        "|" + "---|" * (len(spec.task_names) + 4),
    ]
    for method, s in summary.items():
        accs = " | ".join(f"{s['accuracy'][n]:.3f}" for n in spec.task_names)
        std = f" ± {s['mean_acc_std']:.3f}" if len(args.seeds) > 1 else ""
        lines.append(f"| {method} | {accs} | **{s['mean_acc']:.3f}**{std} | {s['trainable_params']:,} | "
                     f"{s['median_step_time_ms']:.1f} |")
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(summary: dict, spec, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(spec.task_names) + ["mean"]
    x = np.arange(len(labels))
    width = 0.8 / max(len(summary), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (method, s) in enumerate(summary.items()):
        values = [s["accuracy"][n] for n in spec.task_names] + [s["mean_acc"]]
        ax.bar(x + (i - (len(summary) - 1) / 2) * width, values, width, label=method)
    ax.set_xticks(x, labels)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(summary), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("MoLA vs baselines (identical budgets)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from hf_mmsel.data.multitask import load_multitask_benchmark

    data, spec = load_multitask_benchmark(max_per_task=args.max_per_task)
    os.makedirs(args.output_dir, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            start = time.perf_counter()
            result = run_method(method, data, spec, args, seed)
            runs[method].append(result)
            print(f"[benchmark] seed {seed} {method}: mean acc {statistics.mean(result['accuracy'].values()):.4f} "
                  f"{result['accuracy']} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = summarise(runs, spec)
    payload = {"settings": vars(args), "task_names": spec.task_names, "num_labels": spec.num_labels,
               "summary": summary, "runs": runs}
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    write_markdown(summary, spec, args, os.path.join(args.output_dir, "results.md"))
    write_plot(summary, spec, os.path.join(args.output_dir, "results.png"))
    print(Path(args.output_dir, "results.md").read_text())
    return payload


if __name__ == "__main__":
    main()
