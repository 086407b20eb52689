"""ContrastiveTrainer(gsc=True): GSC weighting after selection, epoch-end updates, diagnostics, exact resume,
2-process replication, argument errors. Tiny CLIP on a small noisy easy-vqa subset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from _callbacks import StopAtStep
from _helpers import RECIPES, accelerate_launch, load_recipe, run_checked
from hf_mmsel.data import ImageTextCollator, inject_noisy_correspondence, load_easy_vqa_captions, preprocess_image_text
from hf_mmsel.gsc.hook import GSCHook
from hf_mmsel.hooks import BatchHook
from hf_mmsel.models import build_dual_encoder
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments
from hf_mmsel.state import read_global_arrays

N, B = 96, 16  # 6 steps per epoch
WORKER = Path(__file__).with_name("gsc_dist_worker.py")


def _bundle(captions):
    return build_dual_encoder(captions=captions, image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                              num_heads=2, projection_dim=16, max_length=12, seed=0)


@pytest.fixture(scope="module")
def train_set():
    data = load_easy_vqa_captions(max_train=N, max_test=8)
    data = inject_noisy_correspondence(data, 0.4, seed=0)
    bundle = _bundle(data["train"]["caption"])
    data = preprocess_image_text(data, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                 max_length=12)
    return data["train"]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=B, num_train_epochs=3, learning_rate=2e-3,
                logging_steps=3, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="full",
                gsc=True, disable_tqdm=True, dataloader_num_workers=0, plot_score_distributions=False)
    base.update(kw)
    return ContrastiveTrainingArguments(**base)


def _trainer(out, train_set, hooks=(), **kw):
    bundle = _bundle(train_set["caption"])
    return ContrastiveTrainer(bundle.model, _args(out, **kw), train_dataset=train_set, hooks=list(hooks),
                              data_collator=ImageTextCollator(bundle.tokenizer, max_length=12))


class _Recorder(BatchHook):
    """Runs after selection and GSC: the sample indices trained on, per epoch."""

    def __init__(self):
        self.kept: dict[int, set[int]] = {}

    def prepare(self, batch, ctx):
        self.kept.setdefault(ctx.epoch, set()).update(batch["sample_idx"].tolist())
        return None


class _WeightsAtEpochEnd(TrainerCallback):
    """GSC weights right after every epoch-end update (runs after the trainer's own callback)."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.weights.append(self.trainer.gsc_weights())


def test_gsc_updates_weights_every_epoch_and_logs_diagnostics(tmp_out, train_set):
    trainer = _trainer(tmp_out, train_set, selection_diagnostics=True)
    seen = _WeightsAtEpochEnd(trainer)
    trainer.add_callback(seen)
    trainer.train()
    assert isinstance(trainer.gsc_hook, GSCHook) and trainer.hook.hooks[:2] == [trainer.selection_hook,
                                                                                trainer.gsc_hook]
    assert int(trainer.gsc_hook.buffers.num_updates) == 3 and len(seen.weights) == 3
    w = trainer.gsc_weights()
    assert w.shape == (N,) and bool(torch.isfinite(w).all()) and bool(((w >= 0) & (w <= 1)).all())
    assert not torch.equal(w, torch.ones(N)) and not torch.equal(seen.weights[0], seen.weights[1])
    assert torch.equal(seen.weights[-1], w)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["gsc_weight_mean"] == 1.0  # epoch 0 trains with w = 1
    assert logs[-1]["gsc_weight_mean"] < 1.0 and "gsc_structure_loss" in logs[0]
    epoch_logs = [h for h in trainer.state.log_history if "gsc_weight_auroc" in h]
    assert len(epoch_logs) == 3  # one per epoch end, merged into the next log call
    last = epoch_logs[-1]
    noisy = torch.as_tensor(train_set["is_noisy"]).bool()
    assert last["gsc_weight_mean_clean"] == pytest.approx(float(w[~noisy].mean()), abs=1e-6)
    assert last["gsc_weight_mean_noisy"] == pytest.approx(float(w[noisy].mean()), abs=1e-6)
    from hf_mmsel.metrics import auroc

    assert last["gsc_weight_auroc"] == pytest.approx(auroc(w, ~noisy), abs=1e-6) and last["gsc_num_updated"] == N


def test_dissect_selection_then_gsc_weights_only_the_kept_pairs(tmp_out, train_set):
    recorder = _Recorder()
    trainer = _trainer(tmp_out, train_set, hooks=[recorder], selection_strategy="dissect", select_rate=0.5,
                       selection_warmup_epochs=1)
    seen = _WeightsAtEpochEnd(trainer)
    trainer.add_callback(seen)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["selection/kept_fraction"] == 0.5 and math.isfinite(h["loss"]) for h in logs)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[sorted(recorder.kept[2])] = True
    assert 0 < int(kept.sum()) < N
    before, after = seen.weights[1], seen.weights[2]
    assert torch.equal(after[~kept], before[~kept])  # pairs not trained on in epoch 2 keep their weights
    assert not torch.equal(after[kept], before[kept])
    assert int(trainer.gsc_hook.buffers.num_updates) == 3


def _hook_state(path):
    """Per-sample arrays gathered from every rank file plus the replicated part."""
    return {**read_global_arrays(path), **load_file(str(path / "hook_state" / "replicated.safetensors"))}


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_interrupted_and_resumed_run_restores_every_gsc_buffer(tmp_path, train_set):
    kw = dict(num_train_epochs=3, save_strategy="steps", save_steps=3, selection_strategy="dissect",
              selection_warmup_epochs=1, gsc_bank_size=8)
    full = _trainer(tmp_path / "a", train_set, **kw)
    full.train()
    first = _trainer(tmp_path / "b", train_set, **kw)
    first.add_callback(StopAtStep(8))
    first.train()
    # checkpoint-6 is the last step of pass 0: the pass-end GSC update runs after the optimizer step, before the
    # save, so the checkpoint holds the updated buffers and an empty "seen this pass" mark (NaN consistency)
    ckpt6 = _hook_state(tmp_path / "b" / "checkpoint-6")
    assert int(ckpt6["1.buffers.num_updates"]) == 1 and int((~ckpt6["1.buffers.consistency"].isnan()).sum()) == 0
    assert int(ckpt6["1.bank.count"]) > 0  # the anchor bank is checkpointed too
    resumed = _trainer(tmp_path / "b", train_set, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))

    for step in (9, 12, 15, 18):  # every later checkpoint: identical hook state (selection + GSC buffers + bank)
        _assert_same(_hook_state(tmp_path / "a" / f"checkpoint-{step}"),
                     _hook_state(tmp_path / "b" / f"checkpoint-{step}"))
    _assert_same(full.hook_state_dict(), resumed.hook_state_dict())
    assert any(k.startswith("1.bank.") for k in full.hook_state_dict())
    assert torch.equal(full.gsc_weights(), resumed.gsc_weights())
    assert int(resumed.gsc_hook.buffers.num_updates) == 3
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name

    no_gsc = _trainer(tmp_path / "c", train_set, **{**kw, "gsc": False, "gsc_bank_size": 0})
    with pytest.raises(ValueError, match="trained with gsc=True"):
        no_gsc.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))


@pytest.mark.slow
def test_two_process_gsc_weights_identical_on_both_ranks(tmp_path, train_set):
    train_set.save_to_disk(str(tmp_path / "data"))
    run_checked(accelerate_launch(2) + [str(WORKER), str(tmp_path / "data"), str(tmp_path), "--use_cpu"])
    ranks = [load_file(str(tmp_path / f"gsc_rank{r}.safetensors")) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    w = ranks[0]["final_weights"]
    assert int(ranks[0]["buffers.num_updates"]) == 3 and not torch.equal(w, torch.ones(N))
    assert bool(((w >= 0) & (w <= 1)).all())


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"gsc_gamma": -0.1}, r"gsc_gamma must be >= 0, got -0.1"),
        ({"gsc_beta": 0.0}, r"gsc_beta must be in \(0, 1\]"),
        ({"gsc_beta": 1.5}, r"gsc_beta must be in \(0, 1\]"),
        ({"gsc_bank_size": -1}, "gsc_bank_size must be >= 0"),
        ({"gsc_bank_min_weight": 2.0}, r"gsc_bank_min_weight must be in \[0, 1\]"),
        ({"gsc_structure_similarity": "cos"}, r"gsc_structure_similarity must be one of \['sigmoid', 'affine'\]"),
        ({"gsc_structure_temperature": 0.0}, "gsc_structure_temperature must be > 0"),
        ({"gsc_structure_matching": "l2"}, "gsc_structure_matching must be one of"),
        ({"gsc_gmm_max_iter": 0}, "gsc_gmm_max_iter must be >= 1"),
        ({"gsc_gmm_reg_covar": 0.0}, "gsc_gmm_reg_covar must be > 0"),
        ({"gsc_max_fit_samples": 1}, "gsc_max_fit_samples must be >= 2"),
        ({"gsc_prob_logit_scale": -1.0}, "gsc_prob_logit_scale must be > 0 or None"),
        ({"gsc_structure_max_batch_anchors": 0}, "set gsc_bank_size > 0"),
    ],
)
def test_bad_gsc_settings_raise_clear_errors(tmp_out, setting, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_out, **setting)


def test_gsc_misuse_errors(tmp_out, train_set):
    with pytest.raises(RuntimeError, match="gsc=True"):
        _trainer(tmp_out, train_set, gsc=False).gsc_weights()
    with pytest.raises(ValueError, match="do not also pass one"):
        _trainer(tmp_out, train_set, hooks=[GSCHook()])


def test_train_clip_recipe_gsc_config_and_card(tmp_out):
    import yaml

    recipes = RECIPES
    module = load_recipe("train_clip")
    config = yaml.safe_load((recipes / "configs" / "clip_gsc.yaml").read_text())
    assert config["gsc"] is True and config["selection_strategy"] == "dissect"
    flags = ["--config", str(recipes / "configs" / "clip_gsc.yaml"), "--output_dir", str(tmp_out),
             "--num_train_epochs", "2", "--max_train", "64", "--max_test", "32", "--per_device_train_batch_size",
             "16", "--save_strategy", "no", "--use_cpu", "true", "--image_size", "16", "--patch_size", "8",
             "--hidden_size", "32", "--num_layers", "1", "--selection_warmup_epochs", "1", "--gsc_gamma", "0.01",
             "--plot_score_distributions", "false"]
    _, targs = module.parse_args(flags)
    assert targs.gsc and targs.gsc_gamma == 0.01 and targs.gsc_beta == 0.9  # flag wins over the config (beta from it)
    metrics = module.main(flags)
    assert "eval_rsum" in metrics
    card = (tmp_out / "README.md").read_text()
    assert "dissect+gsc" in card and "| gsc_gamma | 0.01 |" in card and "| gsc_beta | 0.9 |" in card
    w = load_file(str(tmp_out / "gsc_weights.safetensors"))["weights"]
    assert w.shape == (64,) and not torch.equal(w, torch.ones(64))
    with pytest.raises(ValueError, match="gsc_beta must be in"):
        module.parse_args(flags + ["--gsc_beta", "2"])
