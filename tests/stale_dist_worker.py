"""Worker for tests/test_stale_selection.py::test_two_process_stale_selection, run under ``accelerate launch
--multi_gpu --num_processes 2``: DISSect with last_visit scores, exploration and GSC, selected in the trainer and
in the sampler with the same lag; every rank writes its kept sample_idx per step and the gathered last-visit state."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from contrastive_dist_worker import make_bundle, make_dataset  # noqa: E402
from hf_mmsel.data import ImageTextCollator  # noqa: E402
from hf_mmsel.hooks import BatchHook  # noqa: E402


class Recorder(BatchHook):
    def __init__(self):
        self.kept = []

    def prepare(self, batch, ctx):
        self.kept.append(batch["sample_idx"].tolist())
        return None


def run(out: Path, in_sampler: bool):
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="dissect",
        selection_warmup_epochs=1, selection_score_source="last_visit", selection_exploration=0.25, gsc=True,
        selection_lag=4, selection_in_sampler=in_sampler, ddp_find_unused_parameters=False, disable_tqdm=True,
        plot_score_distributions=False,
    )
    rec = Recorder()
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), hooks=[rec])
    trainer.train()
    return trainer, rec


def main(out: Path) -> None:
    import torch.distributed as dist

    results = {}
    for in_sampler in (False, True):
        trainer, rec = run(out / f"sampler{int(in_sampler)}", in_sampler)
        assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
        results[str(in_sampler)] = {
            "kept": rec.kept, "scoring_forwards": trainer.runner.scoring_forwards,
            "last_visit": trainer.runner.gathered("0.last_visit", fill=float("nan")).float().tolist(),
            "hist": trainer.runner.gathered("0.bank.hist").tolist(),
        }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # clean gloo shutdown (an undestroyed group can abort the process at exit)
