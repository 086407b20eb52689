"""2-process DDP worker: MoLA-Router on a tiny LlamaForCausalLM through MolaTrainer, ddp_find_unused_parameters=False.

Run by tests/test_mola_transformers.py with ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo). Every
trainable parameter must get a gradient on every rank (DDP without find_unused_parameters errors otherwise), and the
ranks must end with identical adapter weights.
"""

import json
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model

import hf_mmsel  # noqa: F401
from hf_mmsel.data.easy_vqa_text import AnswerOnlyCollator
from hf_mmsel.models.causal_lm import CAUSAL_LM_TARGET_MODULES, build_causal_lm
from hf_mmsel.mola import MolaConfig
from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

out_dir = sys.argv[1]
torch.set_num_threads(1)
base = build_causal_lm("llama", vocab_size=40, hidden_size=32, intermediate_size=64, seed=0)
torch.manual_seed(1)
model = get_peft_model(base, MolaConfig(r=2, num_experts=3, routing="router", router_input="module:model.embed_tokens",
                                        target_modules=CAUSAL_LM_TARGET_MODULES["llama"], init_weights=False))
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 39, (64, 8), generator=g)
data = Dataset.from_dict({"input_ids": ids.tolist(), "task_id": (torch.arange(64) % 3).tolist()})
args = MolaTrainingArguments(output_dir=out_dir, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=2)
assert args.ddp_find_unused_parameters is False
trainer = MolaTrainer(model=model, args=args, train_dataset=data, data_collator=AnswerOnlyCollator(1),
                      compute_metrics=lambda p: {})
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
trainer.train()
assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
changed = sorted(n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n]))
flat = torch.cat([p.detach().reshape(-1) for n, p in sorted(model.named_parameters()) if p.requires_grad])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
if dist.get_rank() == 0:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    with open(f"{out_dir}/result.json", "w") as fh:
        json.dump({"world_size": dist.get_world_size(), "changed": changed, "steps": trainer.state.global_step,
                   "aux_loss": [e.get("aux_loss") for e in logs]}, fh)
dist.barrier()
dist.destroy_process_group()  # clean gloo shutdown (an undestroyed group can abort the process at exit)
