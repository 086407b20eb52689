"""Worker for tests/test_deepspeed.py: DeepSpeed ZeRO-2 on 2 CPU processes (``DS_ACCELERATOR=cpu``).

DISSect (warm-up 1 pass) on a tiny CLIP (0-dim ``logit_scale``, reshaped for DeepSpeed): run ``a`` uninterrupted,
run ``b`` interrupted at step 6 and resumed from checkpoint-4. DeepSpeed never calls ``_load_from_checkpoint``;
the hook state must come back in ``on_train_begin``. Writes ``summary.json`` (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from transformers import TrainerCallback  # noqa: E402

from _callbacks import StopAtStep  # noqa: E402
from contrastive_dist_worker import make_bundle, make_dataset  # noqa: E402

DS_CONFIG = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True,
             "gradient_clipping": "auto"}


class _Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.seen_at_begin, self.step_at_begin = trainer, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        runner = self.trainer.runner
        self.seen_at_begin = int(runner.gathered("0.bank.seen").sum())
        self.step_at_begin = runner.step


def make_trainer(out: Path):
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=2e-3, logging_steps=1,
        save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, selection_strategy="dissect",
        selection_warmup_epochs=1, disable_tqdm=True, plot_score_distributions=False, deepspeed=DS_CONFIG,
    )
    return ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                              data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))


def main(out: Path) -> None:
    import torch.distributed as dist

    full = make_trainer(out / "a")
    full.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    assert type(full.model_wrapped).__name__ == "DeepSpeedEngine", type(full.model_wrapped).__name__
    bank_full = full.runner.gathered("0.bank.hist")
    first = make_trainer(out / "b")
    first.add_callback(StopAtStep(6))
    first.train()
    resumed = make_trainer(out / "b")
    probe = _Probe(resumed)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(out / "b" / "checkpoint-4"))
    bank_resumed = resumed.runner.gathered("0.bank.hist")
    final_seen = int(resumed.runner.gathered("0.bank.seen").sum())  # collective: every rank
    if dist.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps({
            "seen_at_begin": probe.seen_at_begin, "step_at_begin": probe.step_at_begin,
            "final_seen": final_seen,
            "bank_max_abs_diff": float((bank_full - bank_resumed).abs().max()),
            "logit_scale_shape": list(full.model.logit_scale.shape),
            "saved_logit_scale_shape": list(full.model.state_dict()["logit_scale"].shape),
            "ds_env": os.environ.get("DS_ACCELERATOR"),
        }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
