"""GPU-only check: FSDP resume keeps the sharded hook state (issue 8; FSDP cannot run on CPU through Trainer:
with ``use_cpu`` it silently trains DDP, docs/design.md, Scale §0.4). NOT run by the CPU test suite.

    accelerate launch --num_processes 2 --use_fsdp --fsdp_sharding_strategy FULL_SHARD \
        recipes/gpu/fsdp_resume.py /tmp/fsdp_resume          # 2 GPUs (1 GPU: --num_processes 1)

Run ``a`` trains DISSect + GSC uninterrupted (3 passes), run ``b`` is interrupted at step 6 and resumed from
checkpoint-4; the script asserts that the model really is FSDP-wrapped, that the training and scoring forwards
ran through the wrapper, that the hook state restored in ``on_train_begin`` equals the checkpoint's, and that the
resumed run ends with the same bank and GSC weights (to float tolerance: FSDP reductions may reorder sums).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class _Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.arrays = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.arrays = {k: self.trainer.runner.gathered(k).float().cpu() for k in self.trainer.runner.state.arrays}


def _trainer(out: Path):
    from datasets import Dataset

    from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS, ImageTextCollator
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    n = 256
    bundle = build_dual_encoder(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                                projection_dim=32, max_length=12, seed=0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(EASY_VQA_CLASS_CAPTIONS), (n,), generator=g)
    enc = bundle.tokenizer([EASY_VQA_CLASS_CAPTIONS[i] for i in labels], padding="max_length", max_length=12)
    pixels = torch.rand(n, 3, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    data = Dataset.from_dict({"pixel_values": pixels.numpy(), "input_ids": enc["input_ids"],
                              "attention_mask": enc["attention_mask"], "sample_idx": list(range(n))}).with_format("torch")
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=32, num_train_epochs=3, learning_rate=1e-3, logging_steps=2,
        save_strategy="steps", save_steps=2, report_to=[], seed=0, selection_strategy="dissect",
        selection_warmup_passes=1, gsc=True, disable_tqdm=True, plot_score_distributions=False,
    )
    return ContrastiveTrainer(bundle.model, args, train_dataset=data,
                              data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))


def main(out: Path) -> None:
    from hf_mmsel.state import read_global_arrays

    full = _trainer(out / "a")
    full.train()
    assert full.is_fsdp_enabled, "not running under FSDP: launch with accelerate launch --use_fsdp on GPUs"
    assert full._uses_wrapper_forward(full.model_wrapped)
    final = {k: full.runner.gathered(k).float().cpu() for k in full.runner.state.arrays}
    first = _trainer(out / "b")
    first.add_callback(_StopAt(6))
    first.train()
    resumed = _trainer(out / "b")
    probe = _Probe(resumed)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(out / "b" / "checkpoint-4"))
    saved = read_global_arrays(out / "b" / "checkpoint-4")
    for k, v in saved.items():
        torch.testing.assert_close(probe.arrays[k], v.float(), rtol=0, atol=0, equal_nan=True, msg=k)
    again = {k: resumed.runner.gathered(k).float().cpu() for k in resumed.runner.state.arrays}
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=1e-3, atol=1e-3, equal_nan=True, msg=k)
    if resumed.is_world_process_zero():
        print(json.dumps({"fsdp": True, "arrays": sorted(final), "ok": True}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/fsdp_resume"))
