"""``train_mola.py --model causal_lm``: MoLA-Grad on a tiny causal LM for multi-task instruction-style tuning, against
one shared LoRA of the same trainable budget, on the embedded easy-vqa text benchmark (colour / shape / yes-no
questions answered from a caption, ``hf_mmsel.data.easy_vqa_text``).

    python recipes/train_mola.py --model causal_lm --output_dir /tmp/mola_lm --max_steps 400
    accelerate launch recipes/train_mola.py --model causal_lm --lm_kind gpt2 --output_dir /tmp/mola_gpt2

The base is a random-init ``LlamaForCausalLM`` (or ``GPT2LMHeadModel``) whose transformer is frozen; MoLA puts E = 3
experts of rank r on every attention/MLP projection, the baseline one LoRA of rank E*r on the same modules (same
trainable parameter count); both also train ``embed_tokens``/``lm_head`` (``modules_to_save``, identical for both).
Both runs use the same data, seed, steps and optimiser. The loss and the accuracy are those of the answer token
(``AnswerOnlyCollator``). Writes ``eval_results.json`` (per-task accuracy and answer loss of each method), the MoLA
adapter in ``mola/`` and the LoRA adapter in ``lora_shared/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

METHODS = ("mola_grad", "lora_shared")


@dataclass
class CausalLMArguments:
    """The base causal LM, the adapters and the benchmark size."""

    model: str = field(default="causal_lm", metadata={"help": "Must be 'causal_lm' for this recipe."})
    lm_kind: str = field(default="llama", metadata={"help": "'llama' (LlamaForCausalLM) or 'gpt2' (GPT2LMHeadModel)."})
    methods: list[str] = field(default_factory=lambda: list(METHODS),
                               metadata={"help": "Which of mola_grad, lora_shared to train (default: both)."})
    r: int = field(default=8, metadata={"help": "Rank of each MoLA expert; the shared LoRA gets rank E*r."})
    lora_alpha_per_rank: float = field(default=2.0, metadata={"help": "alpha = this * rank (s = 2 for both)."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the random-init LM."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers of the random-init LM."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width."})
    train_embeddings: bool = field(default=True, metadata={"help": "Train embed/lm_head too (both methods)."})
    model_seed: int = field(default=0, metadata={"help": "Seed of the random-init base LM."})
    train_per_task: int = field(default=2000, metadata={"help": "Training examples per task."})
    test_per_task: int = field(default=500, metadata={"help": "Test examples per task."})
    split_seed: int = field(default=0, metadata={"help": "Sampling seed of the benchmark examples."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace this run's files in --output_dir."})


def parse_args(argv=None):
    from hf_mmsel.cli import parse_args_with_config
    from hf_mmsel.trainers import MolaTrainingArguments

    return parse_args_with_config((CausalLMArguments, MolaTrainingArguments), argv, default_config=None)


def answer_accuracy_metrics(task_names):
    """``compute_metrics`` for answer-only labels: accuracy of the argmax next-token prediction at the answer."""
    import numpy as np

    def compute(eval_pred):
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        labels, task_ids = eval_pred.label_ids
        preds, labels = np.asarray(preds)[:, :-1], np.asarray(labels)[:, 1:]  # logits at t predict token t + 1
        mask = labels != -100
        correct = ((preds == labels) & mask).sum(1) == mask.sum(1)
        task_ids = np.asarray(task_ids).reshape(-1)
        out = {f"acc_{name}": float(correct[task_ids == t].mean()) for t, name in enumerate(task_names)
               if (task_ids == t).any()}
        out["mean_acc"] = float(np.mean([out[f"acc_{n}"] for n in task_names if f"acc_{n}" in out]))
        return out

    return compute


def _argmax(logits, labels):
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def build_adapter_config(method: str, args: CausalLMArguments, num_tasks: int, task_names):
    from peft import LoraConfig

    from hf_mmsel.models.causal_lm import CAUSAL_LM_TARGET_MODULES
    from hf_mmsel.mola import MolaConfig

    targets = CAUSAL_LM_TARGET_MODULES[args.lm_kind]
    saved = None
    if args.train_embeddings:
        saved = ["embed_tokens", "lm_head"] if args.lm_kind == "llama" else ["wte", "lm_head"]
    if method == "mola_grad":
        return MolaConfig(r=args.r, lora_alpha=int(args.lora_alpha_per_rank * args.r), num_experts=num_tasks,
                          target_modules=targets, modules_to_save=saved, task_names=list(task_names))
    if method == "lora_shared":
        rank = num_tasks * args.r
        return LoraConfig(r=rank, lora_alpha=int(args.lora_alpha_per_rank * rank), target_modules=targets,
                          modules_to_save=saved, fan_in_fan_out=args.lm_kind == "gpt2")
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def train_one(method: str, args: CausalLMArguments, training_args, data, spec, tokenizer) -> dict:
    import copy

    from peft import get_peft_model
    from transformers import set_seed

    from hf_mmsel.data.easy_vqa_text import AnswerOnlyCollator
    from hf_mmsel.models.causal_lm import build_causal_lm
    from hf_mmsel.trainers import MolaTrainer

    set_seed(training_args.seed)
    base = build_causal_lm(args.lm_kind, vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                           num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                           intermediate_size=args.intermediate_size, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           seed=args.model_seed)
    set_seed(training_args.seed)
    model = get_peft_model(base, build_adapter_config(method, args, spec.num_tasks, spec.task_names))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targs = copy.deepcopy(training_args)
    targs.output_dir = os.path.join(training_args.output_dir, method)
    trainer = MolaTrainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["test"],
                          data_collator=AnswerOnlyCollator(tokenizer.pad_token_id),
                          compute_metrics=answer_accuracy_metrics(spec.task_names),
                          preprocess_logits_for_metrics=_argmax, task_names=spec.task_names)
    train_result = trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(targs.output_dir)
    result = {k.removeprefix("eval_"): v for k, v in metrics.items()
              if k.startswith("eval_acc_") or k in ("eval_mean_acc", "eval_loss")}
    result.update(trainable_params=trainable, train_loss=train_result.training_loss,
                  train_runtime_s=train_result.metrics.get("train_runtime"))
    return result


def main(argv=None) -> dict:
    args, training_args = parse_args(argv)
    if args.model != "causal_lm":
        raise ValueError(f"train_mola_causal_lm needs --model causal_lm, got {args.model!r}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods has unknown entries {unknown}; choose from {list(METHODS)}")
    from hf_mmsel.data.easy_vqa_text import load_easy_vqa_text_tasks
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    prepare_output_dir(training_args.output_dir, overwrite_output_dir=args.overwrite_output_dir,
                       resume_from_checkpoint=training_args.resume_from_checkpoint)
    with training_args.main_process_first(desc="build the easy-vqa text benchmark"):
        data, spec, tokenizer = load_easy_vqa_text_tasks(train_per_task=args.train_per_task,
                                                         test_per_task=args.test_per_task, seed=args.split_seed)
    results = {m: train_one(m, args, training_args, data, spec, tokenizer) for m in args.methods}
    out = {"methods": results, "task_names": list(spec.task_names), "world_size": training_args.world_size,
           "max_steps": training_args.max_steps, "seed": training_args.seed, "args": asdict(args),
           "train_examples": data["train"].num_rows, "test_examples": data["test"].num_rows}
    if training_args.process_index == 0:
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as fh:
            json.dump(out, fh, indent=2)
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, "tokenizer"))
    flat = {f"{m}/{k}": v for m, r in results.items() for k, v in r.items() if k.startswith(("acc_", "mean_acc",
                                                                                             "loss"))}
    print_run_summary("train_mola --model causal_lm", flat,
                      {m: os.path.join(training_args.output_dir, m) for m in args.methods},
                      is_main_process=training_args.process_index == 0)
    return out


if __name__ == "__main__":
    main()
