"""ContrastiveTrainer on a tiny CLIP: training with selection, logging, errors, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from _callbacks import StopAtStep
from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS, ImageTextCollator
from hf_mmsel.hooks import BatchHook
from hf_mmsel.models import build_dual_encoder
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments
from hf_mmsel.trainers.contrastive import HOOK_STATE_DIR, SCORE_PLOT_NAME

N, B = 64, 16


def _bundle(seed=0):
    return build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              projection_dim=16, max_length=12, seed=seed)


def _dataset(tokenizer, n=N, seed=0, size=16, pixel_noise=0.1):
    """``n`` tiny pairs: a random colour per image plus Gaussian pixel noise, easy-vqa class captions, 40 % flagged
    ``is_noisy``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(EASY_VQA_CLASS_CAPTIONS), (n,), generator=g)
    enc = tokenizer([EASY_VQA_CLASS_CAPTIONS[i] for i in labels], padding="max_length", max_length=12,
                    truncation=True)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    pixels = colour * torch.ones(n, 3, size, size) + pixel_noise * torch.randn(n, 3, size, size, generator=g)
    return Dataset.from_dict({
        "pixel_values": pixels.numpy(), "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
        "label": labels.tolist(), "sample_idx": list(range(n)),
        "is_noisy": (torch.rand(n, generator=g) < 0.4).tolist(),
    }).with_format("torch")


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=B, per_device_eval_batch_size=32,
                num_train_epochs=3, learning_rate=2e-3, logging_steps=2, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, selection_strategy="dissect", selection_warmup_epochs=1,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return ContrastiveTrainingArguments(**base)


class _Recorder(BatchHook):
    """Runs after selection: records the kept sample indices of every step."""

    def __init__(self):
        self.kept: list[list[int]] = []

    def prepare(self, batch, ctx):
        self.kept.append(sorted(batch["sample_idx"].tolist()))
        return None


def _trainer(out, bundle=None, hooks=(), **kw):
    bundle = bundle or _bundle()
    ds = _dataset(bundle.tokenizer)
    return ContrastiveTrainer(
        bundle.model, _args(out, **kw), train_dataset=ds, eval_dataset=_dataset(bundle.tokenizer, 32, seed=1),
        data_collator=ImageTextCollator(bundle.tokenizer, max_length=12), processing_class=bundle.tokenizer,
        class_captions=EASY_VQA_CLASS_CAPTIONS, hooks=list(hooks),
    )


def test_trains_selects_logs_and_evaluates(tmp_out):
    recorder = _Recorder()
    trainer = _trainer(tmp_out, hooks=[recorder], save_strategy="epoch", selection_diagnostics=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert [len(kept) for kept in recorder.kept] == [B // 2] * (3 * N // B)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["selection/kept_fraction"] == 0.5 and 0 <= h["selected_noisy_fraction"] <= 1 for h in logs)
    assert any("selection/score_mean" in h for h in logs)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    bank = trainer.selection_hook.bank
    assert bool(bank.seen.all())  # every pair scored in the last warm-up epoch (epoch 0)
    assert (tmp_out / SCORE_PLOT_NAME).stat().st_size > 1000
    assert (tmp_out / "checkpoint-12" / HOOK_STATE_DIR / "index.json").is_file()
    assert (tmp_out / "checkpoint-12" / HOOK_STATE_DIR / "rank00000-of-00001.safetensors").is_file()
    metrics = trainer.evaluate()
    assert {"eval_i2t_r1", "eval_t2i_r10", "eval_rsum", "eval_zero_shot_acc"} <= set(metrics)
    recalls = [metrics[f"eval_{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0 <= r <= 100 for r in recalls) and metrics["eval_rsum"] == pytest.approx(sum(recalls))
    assert metrics["eval_i2t_r1"] <= metrics["eval_i2t_r5"] <= metrics["eval_i2t_r10"]


def test_full_strategy_and_extra_hook_weights(tmp_out):
    class Halve(BatchHook):
        def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx):
            from hf_mmsel.hooks import LossTerms

            return LossTerms(weights=torch.full_like(per_sample_loss, 0.5), logs={"halve": torch.tensor(1.0)})

    recorder = _Recorder()
    trainer = _trainer(tmp_out, hooks=[recorder, Halve()], selection_strategy="full", num_train_epochs=1,
                       logging_steps=1, learning_rate=0.0, train_sampling_strategy="sequential")
    trainer.train()
    assert recorder.kept == [list(range(i, i + B)) for i in range(0, N, B)]  # full: every candidate kept
    first = ImageTextCollator(trainer.processing_class)([trainer.train_dataset[i] for i in range(B)])
    with torch.no_grad():  # lr 0: the logged loss is half the plain InfoNCE of the first candidate batch
        out = trainer.model(pixel_values=first["pixel_values"], input_ids=first["input_ids"],
                            attention_mask=first["attention_mask"], return_loss=True)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.5 * float(out.loss), rel=1e-4)
    assert trainer.state.log_history[0]["halve"] == 1.0


def test_bad_inputs_get_clear_errors(tmp_out):
    with pytest.raises(ValueError, match=r"select_rate must be in \(0, 1\]"):
        _args(tmp_out, select_rate=0.0)
    with pytest.raises(ValueError, match="dissect_ema"):
        _args(tmp_out, selection_strategy="oracle")
    bundle = _bundle()
    with pytest.raises(TypeError, match="get_image_features"):
        ContrastiveTrainer(torch.nn.Linear(2, 2), _args(tmp_out), train_dataset=_dataset(bundle.tokenizer))
    no_text = Dataset.from_dict({"pixel_values": [[0.0]], "text": ["a"], "sample_idx": [0]})
    with pytest.raises(ValueError, match=r"'caption'.*\['pixel_values', 'text', 'sample_idx'\]"):
        ContrastiveTrainer(bundle.model, _args(tmp_out), train_dataset=no_text)
    with pytest.raises(ValueError, match="reference scores"):
        _trainer(tmp_out, selection_strategy="reference_clipscore").train()


def test_reference_clipscore_uses_a_fixed_reference_model(tmp_out):
    bundle = _bundle()
    trainer = _trainer(tmp_out, bundle=bundle, selection_strategy="reference_clipscore", num_train_epochs=1,
                       train_sampling_strategy="sequential")
    trainer._reference_model = _bundle(seed=5).model
    recorder = _Recorder()
    trainer._extra_hooks.append(recorder)
    trainer.train()
    scores = trainer.selection_hook.strategy.reference_scores
    assert scores.shape == (N,) and bool((scores >= 0).all()) and scores.std() > 0
    for start, kept in zip(range(0, N, B), recorder.kept):  # each batch keeps its top half by reference score
        candidates = torch.arange(start, start + B)
        expected = candidates[torch.topk(scores[candidates], B // 2).indices]
        assert kept == sorted(expected.tolist())


def test_interrupted_and_resumed_run_selects_exactly_the_same(tmp_path):
    kw = dict(num_train_epochs=4, save_strategy="steps", save_steps=6, selection_strategy="dissect",
              selection_warmup_epochs=2)
    full_rec = _Recorder()
    full = _trainer(tmp_path / "a", hooks=[full_rec], **kw)
    full.train()

    first_rec = _Recorder()
    first = _trainer(tmp_path / "b", hooks=[first_rec], **kw)
    first.add_callback(StopAtStep(10))  # mid-epoch 2 (4 steps/epoch), after the snapshot; checkpoint-6 is mid-epoch 1
    first.train()
    resumed_rec = _Recorder()
    resumed = _trainer(tmp_path / "b", hooks=[resumed_rec], **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))

    assert first_rec.kept[:6] + resumed_rec.kept == full_rec.kept
    a, b = full.selection_hook.state_dict(), resumed.selection_hook.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


class _StateAtTrainBegin(TrainerCallback):
    """Copies the trainer's per-sample hook state in on_train_begin (after the trainer's own callback)."""

    def __init__(self, trainer):
        self.trainer, self.arrays = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.arrays = {k: v.clone() for k, v in self.trainer.runner.state.arrays.items()}
        self.hook_step = self.trainer.runner.step


def test_hook_state_restores_without_load_from_checkpoint_and_incomplete_folders_fail(tmp_path, monkeypatch):
    """The backend-independent path: DeepSpeed never calls _load_from_checkpoint, so the hook state must come back
    in on_train_begin; a folder without hook_state/index.json is refused, naming the previous complete one."""
    from hf_mmsel.state import IncompleteCheckpointError, read_global_arrays

    kw = dict(num_train_epochs=3, save_strategy="steps", save_steps=4, selection_warmup_epochs=1)
    _trainer(tmp_path, **kw).train()
    ckpt = tmp_path / "checkpoint-8"
    monkeypatch.setattr(ContrastiveTrainer, "_load_from_checkpoint", lambda self, *a, **k: None)
    resumed = _trainer(tmp_path, **kw)
    probe = _StateAtTrainBegin(resumed)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(ckpt))
    saved = read_global_arrays(ckpt)
    assert probe.hook_step == 8 and bool(saved["0.bank.seen"].all())
    for name, value in saved.items():
        torch.testing.assert_close(probe.arrays[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    (tmp_path / "checkpoint-12" / "hook_state" / "index.json").unlink()  # a save killed before index.json
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-12 is incomplete.*checkpoint-8"):
        _trainer(tmp_path, **kw).train(resume_from_checkpoint=True)


def test_schedules_follow_max_steps_and_warmup_reaching_the_end_fails(tmp_out):
    trainer = _trainer(tmp_out, max_steps=32, selection_warmup_epochs=None)  # 4 batches per pass: 8 passes
    trainer.train()
    assert trainer.runner.schedule.batches_per_pass == 4 and trainer.selection_hook.strategy.warmup_epochs == 2
    assert trainer.runner.passes_ended == 8
    with pytest.raises(ValueError, match=r"warm-up of 8 passes reaches the end of training \(8 passes"):
        _trainer(tmp_out, max_steps=32, selection_warmup_epochs=8).train()
    with pytest.raises(ValueError, match=r"warm-up of 3 passes reaches the end of training \(3 passes"):
        _args(tmp_out, num_train_epochs=3, selection_warmup_epochs=3)
