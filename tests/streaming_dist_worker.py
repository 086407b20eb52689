"""Worker for tests/test_streaming_training.py: DISSect + GSC from local WebDataset shards (streaming, max_steps).

Run with 1 process (``python``) or 2 (``accelerate launch --multi_gpu --num_processes 2``; world size asserted).
Three runs in ``out``: ``a`` uninterrupted (12 steps, checkpoints every 3), ``b`` interrupted at step 7 and ``b``
resumed from checkpoint-6 (mid-pass). Every call of the per-sample state updates of run ``a`` is logged per rank
(``log_rank{r}.pt``), so the test can replay them in one process and compare with the gathered sharded state.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from _callbacks import StopAtStep  # noqa: E402

STEPS, SAVE = 12, 3


def make_trainer(shards: str, out: Path, world: int):
    from hf_mmsel.data import ImageTextCollator, load_image_text_dataset
    from hf_mmsel.data.easy_vqa import EASY_VQA_CLASS_CAPTIONS
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = build_dual_encoder(captions=list(EASY_VQA_CLASS_CAPTIONS), image_size=16, patch_size=8,
                                hidden_size=32, num_layers=1, num_heads=2, projection_dim=16, max_length=12, seed=0)
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8 if world == 2 else 16, max_steps=STEPS,
        learning_rate=2e-3, logging_steps=3, save_strategy="steps", save_steps=SAVE, report_to=[], use_cpu=True,
        seed=0, selection_strategy="dissect", select_rate=0.5, selection_warmup_epochs=1, gsc=True,
        gsc_bank_size=8, ddp_find_unused_parameters=False, disable_tqdm=True,
        dataloader_num_workers=int(os.environ.get("STREAM_WORKERS", "0")),
        plot_score_distributions=False,
    )
    data = load_image_text_dataset(shards, streaming=True)
    return ContrastiveTrainer(bundle.model, args, train_dataset=data,
                              data_collator=ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform,
                                                              max_length=12))


def install_logger(log: list, runner_of):
    """Log every ScoreBank.update / GSCBuffers.record / GSCBuffers.epoch_update call (the sharded updates)."""
    from hf_mmsel.gsc.buffers import GSCBuffers
    from hf_mmsel.selection.bank import ScoreBank

    bank_update, gsc_record, gsc_epoch = ScoreBank.update, GSCBuffers.record, GSCBuffers.epoch_update

    def update(self, idx, scores, mode="overwrite", beta=0.9):
        log.append({"op": "bank", "idx": idx.clone(), "scores": scores.clone(), "mode": mode, "beta": beta})
        return bank_update(self, idx, scores, mode=mode, beta=beta)

    def record(self, sample_idx, consistency, positive_prob):
        log.append({"op": "record", "idx": sample_idx.clone(), "c": consistency.detach().clone(),
                    "p": positive_prob.detach().clone()})
        return gsc_record(self, sample_idx, consistency, positive_prob)

    def epoch_update(self, **kwargs):
        log.append({"op": "epoch", "kwargs": json.dumps(kwargs)})
        return gsc_epoch(self, **kwargs)

    ScoreBank.update, GSCBuffers.record, GSCBuffers.epoch_update = update, record, epoch_update


def main(shards: str, out: Path) -> None:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    log: list = []
    install_logger(log, None)
    full = make_trainer(shards, out / "a", world)
    assert full.args.world_size == world
    if world > 1:
        assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    full.train()
    rank = full.runner.dist.rank
    kept_full = [int(i) for e in log if e["op"] == "bank" for i in e["idx"]]
    torch.save({"log": log, "owned": full.runner.ownership.global_indices()}, out / f"log_rank{rank}.pt")
    final_full = {name: full.runner.gathered(name) for name in full.runner.state.arrays}

    first = make_trainer(shards, out / "b", world)
    first.add_callback(StopAtStep(7))
    first.train()
    resumed = make_trainer(shards, out / "b", world)
    resumed.train(resume_from_checkpoint=str(out / "b" / "checkpoint-6"))
    final_resumed = {name: resumed.runner.gathered(name) for name in resumed.runner.state.arrays}
    same_state = all(torch.equal(final_full[k].nan_to_num(-7.0), final_resumed[k].nan_to_num(-7.0))
                     for k in final_full)
    same_weights = all(torch.equal(p, q) for p, q in zip(full.model.state_dict().values(),
                                                         resumed.model.state_dict().values()))
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({
            "world_size": world, "same_state": same_state, "same_weights": same_weights,
            "batches_per_pass": full.runner.schedule.batches_per_pass, "passes_ended": full.runner.passes_ended,
            "gsc_updates": int(full.gsc_hook.buffers.num_updates), "num_bank_updates": len(kept_full),
            "bytes_per_rank": full.runner.state_bytes_per_rank(), "num_local": full.runner.ownership.num_local,
        }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
