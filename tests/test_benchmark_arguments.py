"""``benchmark-selection`` parses its trainer flags from ``ContrastiveTrainingArguments`` (help and types included)
and builds each run's arguments from one template: the flags, their defaults and every run's
``ContrastiveTrainingArguments`` are those of the recipe's former hand-written version (``_reference_arguments``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from _helpers import load_recipe

# the flags and defaults of ``hf-mmsel benchmark-selection`` before its trainer flags came from the trainer
OLD_DEFAULTS = {
    "dataset": None, "image_column": "image", "caption_column": "caption", "label_column": None, "noise_ratio": 0.0,
    "noise_ratios": None, "strategies": "dissect,random,full", "select_rate": 0.5, "epochs": 20,
    "selection_warmup_passes": None, "selection_warmup_epochs": None, "seed": 0, "seeds": None,
    "output_dir": "outputs/benchmark-selection", "overwrite_output_dir": False, "batch_size": 128,
    "learning_rate": 0.002, "weight_decay": 0.0, "model": "small", "image_size": 28, "hidden_size": 128,
    "projection_dim": 64, "conv_channels": "16,32,64", "image_pooling": "flatten", "text_mlp": True, "patch_size": 7,
    "num_layers": 2, "max_length": 16, "initializer_factor": 4.0, "logit_scale_init": 10.0, "gsc_gamma": 0.05,
    "gsc_beta": 0.9, "gsc_ema_bias_correction": False, "gsc_prior_beta": 0.9, "gsc_weight_threshold": 0.0,
    "gsc_prob_posterior": True, "loss_type": "softmax", "validation_fraction": 0.1, "eval_every_epochs": 1.0,
    "log_curves": False, "selection_score_source": "fresh", "selection_exploration": 0.0,
    "selection_in_sampler": False, "max_train": None, "max_test": None, "test_fraction": 0.2, "joint_chunks": 16,
    "threads": 1, "curate": False, "reference_epochs": None, "vision_model": None, "text_model": None,
    "vision_checkpoint": None, "lock_image_tower": False, "lock_text_tower": False, "image_unlocked_layers": 0,
    "text_unlocked_layers": 0, "tower_lora_r": 0, "tower_lora_alpha": None, "image_lora_target_modules": None,
    "text_lora_target_modules": None,
}
OLD_DOWNSTREAM_DEFAULTS = {**OLD_DEFAULTS, "noise_ratio": 0.4, "seeds": "0,1,2",
                           "output_dir": "outputs/benchmark-downstream", "curator": "gsc", "curator_model": None,
                           "curation_settings": "default=", "baselines": "random,none", "keep_fractions": "0.3,0.5,0.7",
                           # changed on purpose: the default scores gained negCLIPLoss and curation_score, and the
                           # held-out curator its fraction (0 = off, the earlier behaviour)
                           "scores": "similarity,neg_clip_loss,gsc_clean_prob,curation_score",
                           "curator_holdout_fraction": 0.0}


def _reference_arguments(args, selection: str, seed: int, out: Path, epochs: int, loss_type: str = "softmax",
                         joint: bool = False, gsc: bool = False):
    """The former ``benchmark_selection._training_arguments`` (with its ``_score_source_options`` /
    ``_gsc_options`` / ``_tower_options``), kept as the reference."""
    from hf_mmsel.selection import SELECTION_STRATEGIES
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    strategy = SELECTION_STRATEGIES[selection]
    score_source = {} if strategy.requires not in ("clip_score", "loss") or strategy.needs_reference else dict(
        selection_score_source=args.selection_score_source, selection_exploration=args.selection_exploration,
        selection_in_sampler=args.selection_in_sampler)
    gsc_options = {} if not gsc else dict(
        gsc=True, gsc_gamma=args.gsc_gamma, gsc_beta=args.gsc_beta, gsc_prob_posterior=args.gsc_prob_posterior,
        gsc_weight_threshold=args.gsc_weight_threshold, gsc_ema_bias_correction=args.gsc_ema_bias_correction,
        gsc_prior_beta=args.gsc_prior_beta)
    towers = {name: getattr(args, name) for name in (
        "lock_image_tower", "lock_text_tower", "image_unlocked_layers", "text_unlocked_layers", "tower_lora_r",
        "tower_lora_alpha", "image_lora_target_modules", "text_lora_target_modules")}
    return ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=512,
        num_train_epochs=epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=0.05, lr_scheduler_type="cosine", logging_strategy="epoch", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        selection_strategy=selection, select_rate=args.select_rate,
        selection_warmup_passes=args.selection_warmup_passes, plot_score_distributions=False,
        dataloader_num_workers=0, selection_diagnostics=True, loss_type=loss_type,
        selection_joint=joint, selection_joint_chunks=args.joint_chunks, **score_source, **gsc_options, **towers,
    )


def _comparable(targs) -> dict:
    return {k: v for k, v in targs.to_dict().items() if k not in ("output_dir", "logging_dir")}


def test_every_flag_keeps_its_name_and_default():
    bench = load_recipe("benchmark_selection")
    downstream = load_recipe("benchmark_downstream")
    assert {f.name: f.default for f in dataclasses.fields(bench.BenchmarkArguments)} == OLD_DEFAULTS
    assert {f.name: f.default for f in dataclasses.fields(downstream.DownstreamArguments)} == OLD_DOWNSTREAM_DEFAULTS
    assert dataclasses.asdict(bench.parse_args([])) == OLD_DEFAULTS


def test_trainer_flags_take_the_trainers_help_and_types():
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    bench = load_recipe("benchmark_selection")
    trainer = {f.name: f for f in dataclasses.fields(ContrastiveTrainingArguments)}
    flags = dataclasses.fields(bench.BenchmarkTrainerFlags)
    assert {f.name for f in flags} >= {"learning_rate", "gsc_beta", "selection_score_source", "tower_lora_r"}
    for flag in flags:
        assert flag.metadata == trainer[flag.name].metadata, flag.name
    args = bench.parse_args(["--gsc_beta", "0.7", "--lock_image_tower", "true", "--tower_lora_r", "4",
                             "--image_lora_target_modules", "q_proj,v_proj", "--no_gsc_prob_posterior",
                             "--selection_exploration", "0.1"])
    assert (args.gsc_beta, args.lock_image_tower, args.tower_lora_r, args.gsc_prob_posterior) == (0.7, True, 4, False)
    assert args.image_lora_target_modules == "q_proj,v_proj" and args.selection_exploration == 0.1


def test_help_lists_only_the_benchmarks_flags(capsys):
    bench = load_recipe("benchmark_selection")
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--gsc_beta" in text and "--epochs" in text and "--selection_warmup_epochs" in text
    assert "--per_device_train_batch_size" not in text and "--num_train_epochs" not in text
    assert "--lr_scheduler_type" not in text


RUNS = [  # flags, (selection, epochs, loss_type, joint, gsc) per run
    ([], [("dissect", 20, "softmax", False, False), ("random", 20, "softmax", False, False),
          ("full", 20, "softmax", False, False), ("full", 5, "softmax", False, False)]),
    (["--epochs", "8", "--batch_size", "32", "--learning_rate", "1e-3", "--weight_decay", "0.1", "--seed", "3",
      "--selection_score_source", "last_visit", "--selection_in_sampler", "true", "--selection_exploration", "0.2",
      "--select_rate", "0.3"],
     [("dissect", 8, "softmax", False, False), ("clipscore", 8, "sigmoid", False, False),
      ("random", 8, "softmax", False, False), ("dissect", 8, "softmax", False, True)]),
    (["--gsc_gamma", "0.1", "--gsc_beta", "0.7", "--gsc_ema_bias_correction", "true", "--gsc_prior_beta", "0.5",
      "--gsc_weight_threshold", "0.2", "--no_gsc_prob_posterior", "--selection_warmup_epochs", "2", "--epochs", "6"],
     [("full", 6, "softmax", False, True), ("dissect", 6, "sigmoid", False, True), ("dissect", 6, "softmax", False,
                                                                                   False)]),
    (["--joint_chunks", "4", "--batch_size", "32", "--selection_warmup_passes", "1", "--epochs", "3"],
     [("learnability", 3, "softmax", True, False), ("easy_reference", 3, "softmax", False, False),
      ("reference_clipscore", 3, "softmax", False, False)]),
    (["--lock_image_tower", "true", "--lock_text_tower", "true", "--tower_lora_r", "4", "--tower_lora_alpha", "16",
      "--image_lora_target_modules", "q_proj,v_proj"],
     [("dissect", 20, "softmax", False, False), ("full", 20, "softmax", False, True)]),
    (["--lock_image_tower", "true", "--image_unlocked_layers", "2"], [("small_loss", 20, "softmax", False, False)]),
]


@pytest.mark.parametrize("flags, runs", RUNS)
def test_each_run_gets_the_former_training_arguments(flags, runs, tmp_path):
    bench = load_recipe("benchmark_selection")
    args = bench.parse_args(flags)
    warm = dataclasses.replace(args, selection_warmup_passes=1)  # the untimed warm-up runs' change
    for selection, epochs, loss_type, joint, gsc in runs:
        for run_args in (args, warm):
            seed = run_args.seed + 1
            new = bench.training_arguments(run_args, selection, seed, tmp_path / "new", epochs, loss_type,
                                           joint=joint, gsc=gsc)
            old = _reference_arguments(run_args, selection, seed, tmp_path / "old", epochs, loss_type, joint=joint,
                                       gsc=gsc)
            assert type(new) is type(old) and _comparable(new) == _comparable(old), (flags, selection)
            assert new.output_dir == str(tmp_path / "new")


def test_bad_trainer_flags_fail_before_any_training(tmp_path):
    bench = load_recipe("benchmark_selection")
    with pytest.raises(ValueError, match="tower_lora_r"):
        bench.main(["--tower_lora_r", "4", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
