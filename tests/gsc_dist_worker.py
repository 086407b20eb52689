"""Worker for tests/test_gsc_trainer.py, run under ``accelerate launch --multi_gpu --num_processes 2``.

Trains ``dissect`` selection + GSC weighting for 3 epochs on the cached dataset the test saved to disk and writes
every rank's GSC hook state (``gsc_rank{r}.safetensors``), so the test can compare the ranks' buffers bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main(data_dir: Path, out: Path) -> None:
    import torch.distributed as dist
    from datasets import load_from_disk
    from safetensors.torch import save_file

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    train = load_from_disk(str(data_dir)).with_format("torch")
    bundle = build_dual_encoder(captions=train["caption"], image_size=16, patch_size=8, hidden_size=32,
                                num_layers=1, num_heads=2, projection_dim=16, max_length=12, seed=0)
    args = ContrastiveTrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=2e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="dissect",
        selection_warmup_epochs=1, gsc=True, ddp_find_unused_parameters=False, disable_tqdm=True,
        plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=train,
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    assert trainer.args.world_size == 2
    per_sample = {k.split(".", 1)[1] for k in trainer.runner.state.arrays}  # this rank's shard only
    state = {k: v.contiguous() for k, v in trainer.gsc_hook.state_dict().items() if k not in per_sample}
    for name in ("weight", "ema_topo", "ema_pred"):  # the full arrays, gathered from both owners
        state[f"gathered.{name}"] = trainer.runner.gathered(f"1.buffers.{name}").float()
    state["final_weights"] = trainer.gsc_weights()
    save_file(state, str(out / f"gsc_rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
