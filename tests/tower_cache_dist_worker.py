"""Worker for tests/test_tower_cache.py::test_two_processes_cached_equals_uncached_and_resumes_exactly, run under
``accelerate launch --multi_gpu --num_processes 2``: a LiT run (tiny CLIP, locked image tower, DISSect + GSC) without
the tower cache, with it, and with it interrupted at step 6 and resumed from checkpoint-4. Every rank writes its kept
sample_idx per step, the gathered GSC weights and its cache statistics; rank 0 writes the final weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from _callbacks import StopAtStep  # noqa: E402
from contrastive_dist_worker import make_bundle, make_dataset  # noqa: E402
from hf_mmsel.data import ImageTextCollator  # noqa: E402
from hf_mmsel.hooks import BatchHook  # noqa: E402


class Recorder(BatchHook):
    def __init__(self):
        self.kept = []

    def prepare(self, batch, ctx):
        self.kept.append(batch["sample_idx"].tolist())
        return None


def trainer_for(out: Path, cache: str, stop: int | None = None):
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=2e-3,
        logging_steps=1, save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0,
        selection_strategy="dissect", selection_warmup_epochs=1, gsc=True, lock_image_tower=True,
        tower_embedding_cache=cache, ddp_find_unused_parameters=False, disable_tqdm=True,
        plot_score_distributions=False,
    )
    rec = Recorder()
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), hooks=[rec])
    if stop is not None:
        trainer.add_callback(StopAtStep(stop))
    return trainer, rec


def summary(trainer, rec):
    stats = trainer.tower_cache.stats() if trainer.tower_cache is not None else None
    return {"kept": rec.kept, "w": trainer.gsc_weights().tolist(), "stats": stats}


def main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    results = {}
    for run, cache in (("off", "off"), ("on", "on")):
        trainer, rec = trainer_for(out / run, cache)
        trainer.train()
        assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
        results[run] = summary(trainer, rec)
        if dist.get_rank() == 0:
            save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()},
                      str(out / f"{run}.safetensors"))
    first, rec = trainer_for(out / "b", "on", stop=6)
    first.train()
    results["first"] = summary(first, rec)
    resumed, rec = trainer_for(out / "b", "on")
    resumed.train(resume_from_checkpoint=str(out / "b" / "checkpoint-4"))
    results["resumed"] = summary(resumed, rec)
    if dist.get_rank() == 0:
        save_file({k: v.detach().contiguous() for k, v in resumed.model.state_dict().items()},
                  str(out / "resumed.safetensors"))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # clean gloo shutdown (an undestroyed group can abort the process at exit)
