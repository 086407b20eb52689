"""Worker for tests/test_sigmoid_distributed.py, run under ``accelerate launch --multi_gpu --num_processes 2``.

1. Loss level: a tiny two-tower model (linear encoders + SigLIP's t', b) under DDP; each rank takes 4 of a fixed
   global batch of 8 pairs and computes ``sigmoid_loss_per_sample`` against the texts gathered with gradients.
   Rank 0 writes the per-image losses of both ranks, the global loss and every parameter's (DDP-averaged)
   gradient, to be compared with one process on the concatenated batch.
2. Trainer level: ``ContrastiveTrainer(loss_type="sigmoid")`` on a tiny CLIP (trainer-registered ``logit_bias``),
   full data, sequential batches of 8 per rank; rank 0 writes the logged per-step losses and the final bias.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

GLOBAL_BATCH, DIM_IN, DIM = 8, 6, 5


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.image = torch.nn.Linear(DIM_IN, DIM)
        self.text = torch.nn.Linear(DIM_IN, DIM)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))
        self.logit_bias = torch.nn.Parameter(torch.tensor([-3.0]))

    def forward(self, images, texts):
        return (torch.nn.functional.normalize(self.image(images), dim=-1),
                torch.nn.functional.normalize(self.text(texts), dim=-1))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, DIM_IN, generator=gen)
    return images, images + 0.5 * torch.randn(GLOBAL_BATCH, DIM_IN, generator=gen)


def one_process_reference() -> dict:
    """The same loss and gradients computed by one process on all 8 pairs."""
    from hf_mmsel.losses import sigmoid_loss_per_sample

    model = TwoTower()
    v, u = model(*global_batch())
    per_image = sigmoid_loss_per_sample(v, u, model.logit_scale.exp(), model.logit_bias)
    per_image.mean().backward()
    return {"per_image": per_image.detach().tolist(), "loss": float(per_image.detach().mean()),
            "grads": {n: p.grad.flatten().tolist() for n, p in model.named_parameters()}}


def loss_level(accelerator, out: Path) -> None:
    import torch.distributed as dist

    from hf_mmsel.losses import gather_no_grad, gather_with_grad, sigmoid_loss_per_sample

    rank, world = dist.get_rank(), dist.get_world_size()
    model = accelerator.prepare(TwoTower())
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    images, texts = global_batch()
    k = GLOBAL_BATCH // world
    rows = slice(rank * k, (rank + 1) * k)
    v, u = model(images[rows], texts[rows])  # the DDP forward arms the gradient all-reduce
    inner = model.module
    per_image = sigmoid_loss_per_sample(v, u, inner.logit_scale.exp(), inner.logit_bias,
                                        gather_fn=gather_with_grad, rank=rank)
    per_image.mean().backward()  # DDP averages the ranks' gradients
    all_losses = gather_no_grad(per_image.detach())
    if rank == 0:
        result = {"per_image": all_losses.tolist(), "loss": float(all_losses.mean()),
                  "grads": {n: p.grad.flatten().tolist() for n, p in inner.named_parameters()}}
        (out / "loss_level.json").write_text(json.dumps(result))


def trainer_run(out: Path):
    from contrastive_dist_worker import make_bundle, make_dataset
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = make_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16 // _world(), num_train_epochs=2, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="full",
        train_sampling_strategy="sequential", ddp_find_unused_parameters=False, disable_tqdm=True,
        plot_score_distributions=False, loss_type="sigmoid",
    )
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=make_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))
    trainer.train()
    return trainer


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def main(out: Path) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    loss_level(accelerator, out)
    trainer = trainer_run(out / "trainer")
    assert trainer.args.world_size == 2
    if dist.get_rank() == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        bias = float(trainer.model.logit_bias.detach())
        (out / "trainer.json").write_text(json.dumps({"losses": losses, "logit_bias": bias}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
