"""Both trainers: numbers stay numbers in the progress logs, and no pinned memory (nor its warning) on CPU."""

from __future__ import annotations

import warnings

import torch


def _contrastive_trainer(tmp_path):
    from hf_mmsel.data import ImageTextCollator, load_image_text_dataset
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    train = load_image_text_dataset(split="train", max_samples=128)
    bundle = build_dual_encoder(captions=train["caption"], architecture="small", image_size=28)
    args = ContrastiveTrainingArguments(str(tmp_path), selection_strategy="full", num_train_epochs=2,
                                        per_device_train_batch_size=64, logging_steps=1, save_strategy="no",
                                        use_cpu=True, report_to="none")
    return ContrastiveTrainer(model=bundle.model, args=args, train_dataset=train, eval_dataset=train,
                              data_collator=ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform))


def test_progress_logs_keep_numbers_and_cpu_runs_pin_no_memory(tmp_path, capsys):
    from transformers.trainer_callback import ProgressCallback

    from hf_mmsel.trainers.logging_defaults import NumericProgressCallback

    trainer = _contrastive_trainer(tmp_path)
    assert trainer.args.dataloader_pin_memory is False
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert NumericProgressCallback in kinds and ProgressCallback not in kinds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.evaluate()
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "{'loss': " in text and "'loss': '" not in text  # floats printed as numbers, not strings


def test_mola_trainer_gets_the_same_defaults(tmp_path):
    from peft import get_peft_model

    from hf_mmsel import MolaConfig
    from hf_mmsel.data import MultiTaskSpec
    from hf_mmsel.models.multitask import build_multitask_vit
    from hf_mmsel.trainers import MolaTrainer, MolaTrainingArguments
    from hf_mmsel.trainers.logging_defaults import NumericProgressCallback

    spec = MultiTaskSpec(task_names=["a", "b"], num_labels=[3, 2])
    model = get_peft_model(build_multitask_vit(spec), MolaConfig(r=2, num_experts=2, target_modules=["q_proj"],
                                                                 modules_to_save=["heads"]))
    trainer = MolaTrainer(model=model, args=MolaTrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer.args.dataloader_pin_memory is False
    assert any(type(cb) is NumericProgressCallback for cb in trainer.callback_handler.callbacks)
    assert torch.is_tensor(next(model.parameters()))
