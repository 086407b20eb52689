"""Worker for tests/test_contrastive_distributed.py, run under ``accelerate launch --multi_gpu --num_processes 2``.

Run 1 (``full``, sequential batches) writes the logged per-step losses; run 2 (``dissect``, random batches, W=1)
writes every rank's score-bank shard gathered into the full bank, so the test can compare ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402

from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS, ImageTextCollator  # noqa: E402
from hf_mmsel.models import build_dual_encoder  # noqa: E402

N = 64


def make_bundle():
    return build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              projection_dim=16, max_length=12, seed=0)


def make_dataset(tokenizer) -> Dataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(EASY_VQA_CLASS_CAPTIONS), (N,), generator=g)
    enc = tokenizer([EASY_VQA_CLASS_CAPTIONS[i] for i in labels], padding="max_length", max_length=12)
    pixels = torch.rand(N, 3, 1, 1, generator=g) + 0.1 * torch.randn(N, 3, 16, 16, generator=g)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "input_ids": enc["input_ids"],
                              "attention_mask": enc["attention_mask"], "sample_idx": list(range(N)),
                              "is_noisy": (torch.rand(N, generator=g) < 0.4).tolist()}).with_format("torch")


def run(out: Path, strategy: str, per_device_batch: int, epochs: int, sampling: str):
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device_batch, num_train_epochs=epochs,
        learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        selection_strategy=strategy, selection_warmup_epochs=1, train_sampling_strategy=sampling,
        ddp_find_unused_parameters=False, disable_tqdm=True, plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))
    trainer.train()
    return trainer


def main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    full = run(out / "full", "full", 8, 2, "sequential")
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    assert full.args.world_size == 2
    rank = dist.get_rank()
    if rank == 0:
        losses = [h["loss"] for h in full.state.log_history if "loss" in h]
        (out / "losses.json").write_text(json.dumps(losses))
    dissect = run(out / "dissect", "dissect", 8, 3, "random")
    bank = dissect.selection_hook.bank
    owned = dissect.runner.ownership.global_indices()
    assert bank.hist.numel() == owned.numel() == N // 2 and bool((owned % 2 == rank).all())  # sharded: i mod W
    save_file({"bank.hist": dissect.runner.gathered("0.bank.hist"),
               "bank.seen": dissect.runner.gathered("0.bank.seen"), "owned": owned},
              str(out / f"bank_rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
