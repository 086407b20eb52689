"""Worker for tests/test_learnability.py's 2-process test (``accelerate launch --multi_gpu --num_processes 2``).

Run 1: ``learnability`` with lr 0 and the reference folder ``out/reference``; every rank writes, per step, its
candidate and kept ``sample_idx``. Run 2: JEST joint selection (2 chunks) with training; every rank writes the
number of pairs it kept per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from contrastive_dist_worker import make_bundle, make_dataset  # noqa: E402
from hf_mmsel.data import ImageTextCollator  # noqa: E402
from hf_mmsel.selection import SelectionHook  # noqa: E402

RECORDS: list[dict] = []
_prepare = SelectionHook.prepare


def _recording_prepare(self, batch, ctx):
    keep = _prepare(self, batch, ctx)
    RECORDS.append({"candidates": batch["sample_idx"].tolist(), "kept": batch["sample_idx"][keep].tolist()})
    return keep


SelectionHook.prepare = _recording_prepare


def run(out: Path, **kw):
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="learnability",
        selection_reference_model=str(out.parent / "reference"), train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False, disable_tqdm=True, plot_score_distributions=False, **kw,
    )
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))
    trainer.train()
    return trainer


def main(out: Path) -> None:
    import torch.distributed as dist

    trainer = run(out / "independent", learning_rate=0.0)
    assert dist.is_initialized() and dist.get_world_size() == 2 and trainer.args.world_size == 2, "expected 2 ranks"
    rank = dist.get_rank()
    (out / f"independent_rank{rank}.json").write_text(json.dumps(RECORDS))
    RECORDS.clear()
    run(out / "joint", learning_rate=2e-3, selection_joint=True, selection_joint_chunks=2)
    (out / f"joint_rank{rank}.json").write_text(json.dumps(RECORDS))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
