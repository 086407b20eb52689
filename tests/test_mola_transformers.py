"""MoLA on transformers models (issue 11): ViTForImageClassification with per-task heads, LlamaForCausalLM and
GPT2LMHeadModel (tiny, from config): task_ids through Trainer batches, generate() with per-row task ids and KV cache,
gradient checkpointing (reentrant and not), bf16, transformers' add_adapter with a router."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel.models.causal_lm import CAUSAL_LM_TARGET_MODULES, build_causal_lm
from hf_mmsel.mola import MolaConfig

E = 3
VOCAB = 40


def causal_mola(kind: str, routing: str = "task", **kw):
    base = build_causal_lm(kind, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, seed=0)
    cfg = dict(r=4, lora_alpha=32, num_experts=E, routing=routing, target_modules=CAUSAL_LM_TARGET_MODULES[kind],
               init_weights=False)
    cfg.update(kw)
    torch.manual_seed(1)
    return get_peft_model(base, MolaConfig(**cfg))


# --- generate ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_routes_every_token_of_each_row_to_its_task(kind):
    model = causal_mola(kind).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, VOCAB - 1, (6, 5), generator=g)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0])
    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    mixed = model.generate(input_ids=prompts, task_ids=task_ids, use_cache=True, **gen)
    assert mixed.shape == (6, 11)
    for t in range(E):  # per-task reference decodes: the rows of task t alone, the whole batch routed to t
        rows = task_ids == t
        ref = model.generate(input_ids=prompts[rows], task_ids=t, use_cache=True, **gen)
        assert torch.equal(mixed[rows], ref)
    # routing matters: the same prompts decoded under other tasks differ, and the cache does not change the tokens
    others = model.generate(input_ids=prompts, task_ids=(task_ids + 1) % E, use_cache=True, **gen)
    assert not torch.equal(others[:, 5:], mixed[:, 5:])
    assert torch.equal(model.generate(input_ids=prompts, task_ids=task_ids, use_cache=False, **gen), mixed)
    # beams: each row's beams keep the row's task
    beams = model.generate(input_ids=prompts[:2], task_ids=task_ids[:2], num_beams=2, num_return_sequences=2, **gen)
    assert beams.shape == (4, 11)
    with pytest.raises(ValueError, match="task_ids"):
        model.generate(input_ids=prompts, **gen)


# --- gradient checkpointing, bf16 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["task", "router"])
def test_gradient_checkpointing_reentrant_and_not_matches_plain_backward(routing):
    extra = {"router_input": "module:model.embed_tokens"} if routing == "router" else {}
    model = causal_mola("llama", routing=routing, **extra)
    ids = torch.randint(3, VOCAB - 1, (4, 7), generator=torch.Generator().manual_seed(2))
    task_ids = torch.tensor([0, 1, 2, 0])
    model.train()

    def grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, task_ids=task_ids)
        (out.loss + model.base_model.mola_aux_loss(task_ids)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    assert all(g is not None for g in plain.values())
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ckpt = grads()
        model.gradient_checkpointing_disable()
        for name, grad in plain.items():
            torch.testing.assert_close(ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=f"{name} reentrant={reentrant}")


def test_bf16_causal_lm_trains_with_float32_experts():
    base = build_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64).to(torch.bfloat16)
    model = get_peft_model(base, MolaConfig(r=4, num_experts=E, target_modules=CAUSAL_LM_TARGET_MODULES["llama"]))
    assert {p.dtype for n, p in model.named_parameters() if "mola_" in n} == {torch.float32}
    ids = torch.randint(3, VOCAB - 1, (3, 6))
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1, 2]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- inject_adapter_in_model (what transformers' add_adapter calls) on a transformers model --------------------------
def test_inject_adapter_in_model_on_a_causal_lm_keeps_router_trainable_and_saved():
    # transformers 5.24's model.add_adapter needs peft >= 0.22 (this project pins 0.21): it calls exactly this
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    base = build_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    base = inject_adapter_in_model(MolaConfig(r=2, num_experts=E, routing="router",
                                              router_input="module:model.embed_tokens",
                                              target_modules=["q_proj", "v_proj"]), base)
    router = [n for n, p in base.named_parameters() if "mola_router" in n and p.requires_grad]
    assert router
    state = get_peft_model_state_dict(base)
    assert any("mola_router" in k for k in state) and any("mola_A" in k for k in state)
    ids = torch.randint(3, VOCAB - 1, (2, 5))
    base(input_ids=ids, labels=ids).loss.backward()
    assert all(base.get_parameter(n).grad is not None for n in router)


# --- ViTForImageClassification with per-task heads, Trainer batches ------------------------------------------------
def _toy_images(n: int, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    task_ids = torch.arange(n) % E
    labels = torch.randint(0, 2, (n,), generator=g)
    pixels = torch.randn(n, 3, 8, 8, generator=g) * 0.1
    pixels[:, task_ids % 3] += (labels * 2 - 1)[:, None, None].float()  # task t: the label's sign in channel t
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.tolist(), "task_id": task_ids.tolist()})


def test_vit_for_image_classification_with_per_task_heads_through_trainer(tmp_path):
    from hf_mmsel.models.multitask import build_vit_for_multitask_classification
    from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

    base = build_vit_for_multitask_classification([2, 2, 2], image_size=8, patch_size=4, hidden_size=16,
                                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    from transformers import ViTForImageClassification

    assert isinstance(base, ViTForImageClassification)
    model = get_peft_model(base, MolaConfig(r=2, num_experts=E, target_modules=["q_proj", "v_proj", "fc1"],
                                            modules_to_save=["classifier"], init_weights=False))
    x, task_ids = torch.randn(6, 3, 8, 8), torch.arange(6) % E
    mixed = model(pixel_values=x, task_ids=task_ids).logits
    for t in range(E):
        rows = task_ids == t
        torch.testing.assert_close(mixed[rows], model(pixel_values=x[rows], task_ids=t).logits, rtol=1e-5, atol=1e-5)
    args = MolaTrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=12,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, logging_steps=3)
    trainer = MolaTrainer(model=model, args=args, train_dataset=_toy_images(48), eval_dataset=_toy_images(24, 1),
                          task_names=["a", "b", "c"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_acc_a", "eval_acc_b", "eval_acc_c", "eval_mean_acc"} <= set(metrics)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("mola_B" in n for n in changed) and any("classifier" in n for n in changed)


def test_causal_lm_task_ids_flow_through_trainer_batches_with_task_type(tmp_path):
    from datasets import Dataset

    from hf_mmsel.data.easy_vqa_text import AnswerOnlyCollator
    from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

    base = build_causal_lm("gpt2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    model = get_peft_model(base, MolaConfig(r=2, num_experts=E, task_type="CAUSAL_LM",
                                            target_modules=CAUSAL_LM_TARGET_MODULES["gpt2"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 1, (24, 6), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "task_id": (torch.arange(24) % E).tolist()})
    seen = []
    hook = model.base_model.model.register_forward_pre_hook(lambda m, a, k: seen.append(set(k)), with_kwargs=True,
                                                            prepend=True)
    args = MolaTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = MolaTrainer(model=model, args=args, train_dataset=data, compute_metrics=lambda p: {},
                          data_collator=AnswerOnlyCollator(pad_token_id=1))
    trainer.train()
    hook.remove()
    assert seen and all("mola_task_ids" in keys for keys in seen)  # renamed past PeftModelForCausalLM.forward
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_easy_vqa_text_benchmark_answers_come_from_the_caption():
    from hf_mmsel.data.easy_vqa_text import TEXT_TASK_NAMES, AnswerOnlyCollator, load_easy_vqa_text_tasks

    data, spec, tok = load_easy_vqa_text_tasks(train_per_task=40, test_per_task=20, seed=0)
    assert spec.task_names == list(TEXT_TASK_NAMES) and data["test"].num_rows == 60
    for row in data["train"]:
        caption = row["prompt"].split(" . ")[0].split()  # "a {color} {shape}"
        task, answer = row["task_id"], row["answer"]
        if task == 0:
            assert answer == caption[1] and "color" in row["prompt"]
        elif task == 1:
            assert answer == caption[2]
        else:
            assert answer in ("yes", "no")
        assert tok.decode([row["input_ids"][row["answer_position"]]]) == answer
    assert sum(r == "yes" for r in data["train"]["answer"][80:]) == 20  # yes/no balanced
    batch = AnswerOnlyCollator(tok.pad_token_id)([data["train"][0], data["train"][-1]])
    assert (batch["labels"] != -100).sum(1).tolist() == [1, 1] and batch["task_ids"].tolist() == [0, 2]


def test_two_process_ddp_trains_router_causal_lm_without_find_unused_parameters(tmp_path):
    import json
    from pathlib import Path

    from _helpers import accelerate_launch, run_checked

    worker = Path(__file__).resolve().parent / "mola_causal_dist_worker.py"
    run_checked([*accelerate_launch(2), str(worker), str(tmp_path)], timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert any("mola_router" in n for n in result["changed"]) and any("mola_B" in n for n in result["changed"])
    assert all(a is not None and a > 0 for a in result["aux_loss"])

