"""MultiTaskClassifier (per-task heads + loss) and MolaTrainer (task_ids, TwD, per-task accuracy)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel import MolaConfig
from hf_mmsel.data.multitask import MultiTaskSpec
from hf_mmsel.models.multitask import (
    INVALID_LOGIT,
    build_multitask_vit,
    load_multitask_vit,
    save_multitask_vit,
    vit_target_modules,
)
from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments

SPEC = MultiTaskSpec(["a", "b", "c"], [4, 2, 3])


def tiny_model(seed: int = 0):
    return build_multitask_vit(SPEC, image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, seed=seed)


def toy_dataset(n: int = 48, seed: int = 0) -> Dataset:
    """Learnable toy data: the label is written into the image as a bright pixel row."""
    g = torch.Generator().manual_seed(seed)
    task_ids = torch.randint(0, SPEC.num_tasks, (n,), generator=g)
    labels = torch.stack([torch.randint(0, SPEC.num_labels[t], (1,), generator=g)[0] for t in task_ids])
    pixels = 0.1 * torch.randn(n, 3, 8, 8, generator=g)
    pixels[torch.arange(n), :, labels, :] += 2.0
    pixels[torch.arange(n), :, :, 7 - task_ids] += 1.0
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.numpy(),
                              "task_id": task_ids.numpy()}).with_format("torch")


def test_loss_is_sum_of_per_task_mean_ce_and_logits_are_padded():
    model = tiny_model()
    x = torch.randn(5, 3, 8, 8)
    task_ids = torch.tensor([0, 0, 1, 2, 2])
    labels = torch.tensor([3, 1, 1, 0, 2])
    out = model(pixel_values=x, task_ids=task_ids, labels=labels)
    assert out.logits.shape == (5, 4)
    assert (out.logits[2, 2:] == INVALID_LOGIT).all() and (out.logits[3, 3:] == INVALID_LOGIT).all()
    assert (out.logits[0] > INVALID_LOGIT).all()
    expected = 0.0
    for t, n in enumerate(SPEC.num_labels):
        rows = task_ids == t
        expected = expected + torch.nn.functional.cross_entropy(out.logits[rows, :n], labels[rows])
    torch.testing.assert_close(out.loss, expected)
    # each sample uses its own head: changing head 1 changes only the task-1 row
    with torch.no_grad():
        model.heads.weight[1] += 1.0
    out2 = model(pixel_values=x, task_ids=task_ids)
    changed = (out2.logits != out.logits).any(dim=1)
    assert changed.tolist() == [False, False, True, False, False]


def test_task_ids_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs `task_ids`"):
        model(pixel_values=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"`task_ids` must lie in \[0, 3\)"):
        model(pixel_values=torch.randn(2, 3, 8, 8), task_ids=torch.tensor([0, 3]))


@pytest.mark.parametrize("routing", ["task", "router"])
def test_mola_wrapped_classifier_gets_task_ids_and_matches_base_at_init(routing):
    base = tiny_model()
    x, task_ids = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        reference = base(pixel_values=x, task_ids=task_ids).logits
    extra = {"router_input": "module:backbone.embeddings"} if routing == "router" else {}
    model = get_peft_model(base, MolaConfig(r=2, lora_alpha=4, num_experts=3, routing=routing,
                                            target_modules=vit_target_modules(base), modules_to_save=["heads"], **extra))
    with torch.no_grad():
        out = model(pixel_values=x, task_ids=task_ids).logits  # MoLA's hook leaves task_ids for the heads
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_classifier_has_no_task_id_workaround_hook():
    # MoLA keeps `task_ids` for a root forward that declares it: the classifier needs no pre-hook of its own
    model = tiny_model()
    assert not model._forward_pre_hooks
    assert "head_task_ids" not in __import__("inspect").signature(model.forward).parameters


@pytest.mark.parametrize("key", ["task_ids", "mola_task_ids"])
def test_mola_grad_on_classifier_routes_experts_and_heads_with_the_same_ids(key):
    base = tiny_model()
    model = get_peft_model(base, MolaConfig(r=2, lora_alpha=4, num_experts=3, init_weights=False,
                                            target_modules=vit_target_modules(base), modules_to_save=["heads"]))
    x, task_ids = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        mixed = model(pixel_values=x, **{key: task_ids}).logits
        for t in range(3):  # one task at a time: expert t and head t for every sample
            rows = task_ids == t
            single = model(pixel_values=x[rows], **{key: torch.full((int(rows.sum()),), t)}).logits
            torch.testing.assert_close(mixed[rows], single, rtol=1e-5, atol=1e-5)
        # heads follow the ids: the padded slots of task 1 (2 labels) are invalid
        assert (mixed[task_ids == 1, 2:] == INVALID_LOGIT).all()
    with pytest.raises(ValueError, match="task_ids"):
        model(pixel_values=x)  # MoLA-Grad still requires them


def test_router_on_input_of_classifier_is_a_conv_router_that_reloads(tmp_path):
    from peft import PeftModel

    base = tiny_model()
    model = get_peft_model(base, MolaConfig(r=2, lora_alpha=4, num_experts=3, routing="router", router_input="input",
                                            init_weights=False, target_modules=vit_target_modules(base),
                                            modules_to_save=["heads"]))
    router = model.base_model.mola_router["default"]
    assert router.kind == "conv" and router.net[0].in_channels == 3  # images [N, 3, H, W], not ViT tokens
    x, task_ids = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    out = model(pixel_values=x, task_ids=task_ids)  # router gates from the image; heads from task_ids
    assert out.logits.shape == (5, 4)
    assert model.base_model.last_router_logits["default"].shape == (5, 3)
    out.logits.square().mean().backward()
    assert router.net[0].weight.grad.abs().sum() > 0
    model.save_pretrained(str(tmp_path / "ad"))
    loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "ad"))
    assert loaded.base_model.mola_router["default"].kind == "conv"
    for key, value in model.base_model.mola_router["default"].state_dict().items():
        assert torch.equal(loaded.base_model.mola_router["default"].state_dict()[key], value)
    with torch.no_grad():
        expected = model(pixel_values=x, task_ids=task_ids).logits
        assert torch.equal(loaded(pixel_values=x, task_ids=task_ids).logits, expected)
    # an explicit kind overrides the inference; the wrong one fails with a message naming the option
    mlp = get_peft_model(tiny_model(), MolaConfig(r=2, num_experts=3, routing="router", router_kind="mlp",
                                                  router_in_features=16, target_modules=["q_proj"],
                                                  modules_to_save=["heads"]))
    assert mlp.base_model.mola_router["default"].kind == "mlp"
    with pytest.raises(ValueError, match="router_kind"):
        mlp(pixel_values=x, task_ids=task_ids)


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=16, per_device_eval_batch_size=32,
                    learning_rate=5e-3, logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0)
    defaults.update(kw)
    return MolaTrainingArguments(**defaults)


def test_trainer_defaults():
    args = MolaTrainingArguments(output_dir="unused", report_to=[])
    assert args.remove_unused_columns is False and args.label_names == ["labels", "task_ids"]


def test_trainer_mola_grad_learns_and_reports_per_task_accuracy(tmp_path):
    base = tiny_model()
    model = get_peft_model(base, MolaConfig(r=4, lora_alpha=8, num_experts=3, target_modules=vit_target_modules(base),
                                            modules_to_save=["heads"]))
    train, test = toy_dataset(96, seed=0), toy_dataset(48, seed=1)
    trainer = MolaTrainer(model=model, args=_args(tmp_path, max_steps=40), train_dataset=train, eval_dataset=test)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for name in SPEC.task_names:
        assert 0.0 <= after[f"eval_acc_{name}"] <= 1.0
    mean = sum(after[f"eval_acc_{n}"] for n in SPEC.task_names) / SPEC.num_tasks
    assert after["eval_mean_acc"] == pytest.approx(mean)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_mean_acc"] > before["eval_mean_acc"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all("aux_loss" not in entry for entry in logs)  # no TwD in task mode


def test_trainer_router_adds_and_logs_twd(tmp_path):
    base = tiny_model()
    model = get_peft_model(base, MolaConfig(r=2, lora_alpha=4, num_experts=3, routing="router", twd_weight=0.5,
                                            router_input="module:backbone.embeddings",
                                            target_modules=vit_target_modules(base), modules_to_save=["heads"]))
    trainer = MolaTrainer(model=model, args=_args(tmp_path, max_steps=10), train_dataset=toy_dataset(64))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
    model.train()
    total = trainer.compute_loss(model, dict(batch))
    task_only = model(**dict(batch)).loss
    twd = model.base_model.mola_aux_loss(batch["task_ids"])
    torch.testing.assert_close(total, task_only + twd)
    assert twd > 0
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(entry["aux_loss"] > 0 for entry in logs)
    # the router and its TwD projection were trained
    assert any("mola_router" in n and p.requires_grad for n, p in model.named_parameters())


def test_trainer_works_with_plain_lora_and_save_load_of_base(tmp_path):
    base = tiny_model()
    save_multitask_vit(base, str(tmp_path / "base"))
    reloaded = load_multitask_vit(str(tmp_path / "base"))
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([2, 0, 1])
    assert torch.equal(reloaded(pixel_values=x, task_ids=t).logits, base(pixel_values=x, task_ids=t).logits)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=vit_target_modules(base), modules_to_save=["heads"]))
    trainer = MolaTrainer(model=model, args=_args(tmp_path / "out", max_steps=3), train_dataset=toy_dataset(32),
                          eval_dataset=toy_dataset(16, seed=2))
    trainer.train()
    assert "eval_mean_acc" in trainer.evaluate()


def test_models_package_reexports_multitask_names_lazily():
    import subprocess
    import sys

    code = (
        "import sys, hf_mmsel.models as m\n"
        "assert 'hf_mmsel.models.multitask' not in sys.modules, 'eager import'\n"
        "from hf_mmsel.models import MultiTaskClassifier, build_multitask_vit\n"
        "from hf_mmsel.models import multitask as mt\n"
        "assert MultiTaskClassifier is mt.MultiTaskClassifier and build_multitask_vit is mt.build_multitask_vit\n"
        "assert set(m._LAZY_MULTITASK) == set(mt.__all__), set(m._LAZY_MULTITASK) ^ set(mt.__all__)\n"
        "assert set(mt.__all__) <= set(m.__all__) and set(mt.__all__) <= set(dir(m))\n"
        "try:\n    m.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
