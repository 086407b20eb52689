"""Scale benchmark of the sharded per-sample state (issue 8) and the trainer's throughput overhead.

    python recipes/benchmark_scale.py --num_samples 1e6,1e7,1e8 --world_sizes 1,2 --output_dir outputs/benchmarks/scale
    python recipes/benchmark_scale.py --throughput true --output_dir outputs/benchmarks/throughput

State mode, with synthetic per-sample scores (no images, no model): for every ``N`` and world size ``W`` (``W``
processes on gloo, spawned here), every rank builds the trainer's hook chain (DISSect selection + GSC,
``hf_mmsel.state.HookRunner``), runs ``--steps`` candidate batches of ``--batch_size`` owned samples with random
unit embeddings (the scoring forward replaced by fixed tensors), a pass-end GSC update, and a checkpoint save and
load. ``results.json``: one row per (N, W) with ``num_samples``, ``world_size``, ``state_bytes_per_sample_per_rank``
(largest rank's bytes / N), ``hook_ms_per_step`` (median over steps and ranks: selection + GSC terms + state
updates), ``pass_end_ms``, ``checkpoint_save_s``, ``checkpoint_load_s``.

Throughput mode: ContrastiveTrainer with ``selection_strategy="full"`` against a hand-written torch loop with the
same model, loss (``clip_loss_per_sample``), AdamW and DataLoader on the embedded easy-vqa data, interleaved in one
process; reports the median samples/s of each and their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ScaleArguments:
    output_dir: str = field(default="outputs/benchmarks/scale")
    overwrite_output_dir: bool = field(default=False)
    num_samples: str = field(default="1e6,1e7,1e8", metadata={"help": "comma-separated pool sizes N"})
    world_sizes: str = field(default="1,2", metadata={"help": "comma-separated process counts"})
    batch_size: int = field(default=256, metadata={"help": "candidate batch B per rank"})
    embed_dim: int = field(default=64)
    steps: int = field(default=30, metadata={"help": "timed candidate batches per (N, W)"})
    warmup_steps: int = field(default=5)
    throughput: bool = field(default=False, metadata={"help": "measure trainer vs hand-written loop instead"})
    throughput_steps: int = field(default=60)
    throughput_repeats: int = field(default=3)
    seed: int = field(default=0)


# ------------------------------------------------------------------------------------------------ state mode
def _build_runner(n: int, world: int, rank: int, batch_size: int, steps: int):
    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.selection import SelectionHook
    from hf_mmsel.state import PassSchedule, SampleOwnership
    from hf_mmsel.state.runner import HookRunner

    selection = SelectionHook("dissect", 0.5, seed=0, warmup_epochs=1)
    runner = HookRunner([selection, GSCHook(gamma=0.05)], {"selection_strategy": "dissect", "gsc": True})
    per_pass = max(1, steps // 2)  # the snapshot pass, then selection
    runner.setup(n, SampleOwnership(n, world, rank), "cpu", PassSchedule(per_pass, 10 * per_pass))
    return runner


def _state_worker(rank: int, world: int, n: int, args: ScaleArguments, init_file: str, result_file: str) -> None:
    import torch.nn.functional as F

    from hf_mmsel.hooks import PairEmbeddings, subset_batch

    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    runner = _build_runner(n, world, rank, args.batch_size, args.steps)
    g = torch.Generator().manual_seed(args.seed * 100 + rank)
    own = runner.ownership
    b, d = args.batch_size, args.embed_dim
    times = []
    for step in range(args.warmup_steps + args.steps):
        idx = own.global_of_slots(torch.randint(0, own.num_local, (b,), generator=g).unique())
        while idx.numel() < b:  # B distinct owned samples
            extra = own.global_of_slots(torch.randint(0, own.num_local, (b,), generator=g))
            idx = torch.cat([idx, extra]).unique()[:b]
        idx = idx[torch.randperm(b, generator=g)]
        v = F.normalize(torch.randn(b, d, generator=g), dim=-1)
        u = F.normalize(v + 0.5 * torch.randn(b, d, generator=g), dim=-1)
        emb = PairEmbeddings(v, u, torch.tensor(10.0))
        batch = {"sample_idx": idx}
        start = time.perf_counter()
        ctx = runner.context(lambda: emb)
        keep = runner.prepare(batch, ctx)
        kept = subset_batch(batch, keep, b) if keep is not None else batch
        kv, ku = (v, u) if keep is None else (v[keep], u[keep])
        kv = kv.clone().requires_grad_(True)
        terms = runner.loss_terms(kv, ku, torch.tensor(10.0), kept["sample_idx"], torch.zeros(kv.shape[0]), ctx)
        elapsed = time.perf_counter() - start
        if step >= args.warmup_steps:
            times.append(elapsed * 1e3)
        del terms
    start = time.perf_counter()
    runner.step = runner.schedule.batches_per_pass * (runner.passes_ended + 1)
    runner.end_completed_passes()
    pass_end_ms = (time.perf_counter() - start) * 1e3
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        if world > 1:  # one folder for every rank: rank 0's name
            holder = [tmp]
            torch.distributed.broadcast_object_list(holder, src=0)
            folder = Path(holder[0]) / "checkpoint"
        else:
            folder = Path(tmp) / "checkpoint"
        start = time.perf_counter()
        runner.save(folder, global_step=runner.step)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        runner.load(folder)
        load_s = time.perf_counter() - start
        if world > 1:
            torch.distributed.barrier()
    row = {"rank": rank, "bytes": runner.state_bytes_per_rank(), "hook_ms": times, "pass_end_ms": pass_end_ms,
           "save_s": save_s, "load_s": load_s}
    Path(f"{result_file}.{rank}").write_text(json.dumps(row))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_state(args: ScaleArguments, out: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    rows = []
    for n in [int(float(x)) for x in args.num_samples.split(",")]:
        for world in [int(x) for x in args.world_sizes.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                init_file, result = str(Path(tmp) / "init"), str(Path(tmp) / "result")
                if world == 1:
                    _state_worker(0, 1, n, args, init_file, result)
                else:
                    mp.spawn(_state_worker, args=(world, n, args, init_file, result), nprocs=world, join=True)
                ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
            hook_ms = [t for r in ranks for t in r["hook_ms"]]
            row = {"num_samples": n, "world_size": world,
                   "state_bytes_per_sample_per_rank": max(r["bytes"] for r in ranks) / n,
                   "state_bytes_per_sample_total": sum(r["bytes"] for r in ranks) / n,
                   "hook_ms_per_step": statistics.median(hook_ms),
                   "hook_ms_per_step_p90": sorted(hook_ms)[int(0.9 * (len(hook_ms) - 1))],
                   "pass_end_ms": max(r["pass_end_ms"] for r in ranks),
                   "checkpoint_save_s": max(r["save_s"] for r in ranks),
                   "checkpoint_load_s": max(r["load_s"] for r in ranks),
                   "batch_size": args.batch_size, "steps": args.steps}
            print(json.dumps(row), flush=True)
            rows.append(row)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


# ------------------------------------------------------------------------------------------- throughput mode
class _SteadyClock:
    """Trainer callback: wall and CPU time from the start of step ``skip`` to the end of the last step."""

    def __new__(cls, skip: int):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.skip, self.start, self.end, self.steps = skip, None, None, 0

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == self.skip:
                    self.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                self.end = (time.perf_counter(), time.process_time())
                self.steps = state.global_step - self.skip

            def rates(self, batch_size: int) -> tuple[float, float]:
                n = self.steps * batch_size
                return n / (self.end[0] - self.start[0]), n / (self.end[1] - self.start[1])

        return Clock()


def run_throughput(args: ScaleArguments, out: Path) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from hf_mmsel.data import ImageTextCollator, load_easy_vqa_captions, preprocess_image_text
    from hf_mmsel.losses import clip_loss_per_sample
    from hf_mmsel.models import build_dual_encoder, encode_pair, logit_scale_of
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    torch.set_num_threads(1)
    data = load_easy_vqa_captions()
    bundle0 = build_dual_encoder(captions=data["train"]["caption"], image_size=28, patch_size=7, seed=0)
    data = preprocess_image_text(data, tokenizer=bundle0.tokenizer, image_transform=bundle0.image_transform,
                                 max_length=16)
    train = data["train"]
    collator = ImageTextCollator(bundle0.tokenizer, max_length=16)
    b, steps = 128, args.throughput_steps

    def fresh():
        return build_dual_encoder(captions=data["train"]["caption"] if "caption" in data["train"].column_names
                                  else None, image_size=28, patch_size=7, seed=0).model

    def trainer_run(tmp):
        model = bundle0.model.__class__(bundle0.model.config)
        model.load_state_dict(bundle0.model.state_dict())
        targs = ContrastiveTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=b, max_steps=steps, learning_rate=1e-3,
            weight_decay=0.0, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, selection_strategy="full", disable_tqdm=True,
            plot_score_distributions=False, dataloader_num_workers=0, max_grad_norm=0.0)  # no clipping, as the loop
        trainer = ContrastiveTrainer(model, targs, train_dataset=train, data_collator=collator)
        clock = _SteadyClock(skip)
        trainer.add_callback(clock)
        trainer.train()
        return clock.rates(b)

    def loop_run():
        model = bundle0.model.__class__(bundle0.model.config)
        model.load_state_dict(bundle0.model.state_dict())
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        loader = DataLoader(train, batch_size=b, shuffle=True, drop_last=True, collate_fn=collator,
                            generator=torch.Generator().manual_seed(0))
        done, marks = 0, None
        while done < steps:
            for batch in loader:
                if done == skip:
                    marks = (time.perf_counter(), time.process_time())
                image, text = encode_pair(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                loss = clip_loss_per_sample(image, text, logit_scale_of(model)).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, 4.6052)
                done += 1
                if done == steps:
                    break
        timed = (steps - skip) * b
        return timed / (time.perf_counter() - marks[0]), timed / (time.process_time() - marks[1])

    del fresh
    skip = 5  # steady state: the first batches (warm caches, Trainer set-up) are not timed
    trainer_sps, loop_sps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer_run(tmp), loop_run()  # untimed warm-up of both paths
        for _ in range(args.throughput_repeats):
            trainer_sps.append(trainer_run(tmp))
            loop_sps.append(loop_run())
    wall_t, cpu_t = [t[0] for t in trainer_sps], [t[1] for t in trainer_sps]
    wall_l, cpu_l = [t[0] for t in loop_sps], [t[1] for t in loop_sps]
    result = {"trainer_samples_per_s": statistics.median(wall_t), "loop_samples_per_s": statistics.median(wall_l),
              "ratio": statistics.median(wall_t) / statistics.median(wall_l),
              "trainer_samples_per_cpu_s": statistics.median(cpu_t), "loop_samples_per_cpu_s": statistics.median(cpu_l),
              "cpu_ratio": statistics.median(cpu_t) / statistics.median(cpu_l),
              "per_repeat_ratio": [t / l for t, l in zip(wall_t, wall_l)],
              "per_repeat_cpu_ratio": [t / l for t, l in zip(cpu_t, cpu_l)], "timed_steps": steps - skip,
              "batch_size": b, "note": "one process, one thread, interleaved, steady-state steps; shared machine"}
    (out / "throughput.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> Any:
    from transformers import HfArgumentParser

    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    (args,) = HfArgumentParser(ScaleArguments).parse_args_into_dataclasses(args=argv)
    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)
    if args.throughput:
        result = run_throughput(args, out)
        print_run_summary("benchmark_scale (throughput)", result, {"results": out / "throughput.json"})
        return result
    rows = run_state(args, out)
    print_run_summary("benchmark_scale (state)", {f"N={r['num_samples']:.0e} W={r['world_size']} hook ms":
                                                  r["hook_ms_per_step"] for r in rows},
                      {"results": out / "results.json"})
    return rows


if __name__ == "__main__":
    main()
