"""``--loss_type`` on recipes/train_clip.py (a tiny SiglipModel) and recipes/benchmark_selection.py (both losses,
and the validation split carved from train)."""

from __future__ import annotations

import json

import pytest

from _helpers import load_recipe


def test_train_clip_trains_a_tiny_siglip_with_the_sigmoid_loss(tmp_out):
    from transformers import SiglipModel

    train_clip = load_recipe("train_clip")
    metrics = train_clip.main([
        "--output_dir", str(tmp_out), "--architecture", "siglip", "--loss_type", "sigmoid", "--use_cpu", "true",
        "--max_train", "64", "--max_test", "32", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
        "--image_size", "16", "--patch_size", "8", "--hidden_size", "32", "--num_layers", "1", "--max_length", "12",
        "--selection_strategy", "small_loss", "--save_strategy", "no", "--report_to", "none",
        "--noise_ratio", "0.4", "--gsc", "true",
    ])
    assert "eval_rsum" in metrics
    model = SiglipModel.from_pretrained(str(tmp_out))
    assert float(model.logit_bias.detach()) != -10.0  # trained, and saved with the weights
    assert "sigmoid" in (tmp_out / "README.md").read_text()


def test_benchmark_runs_both_losses_on_a_validation_split(tmp_out):
    bench = load_recipe("benchmark_selection")
    results = bench.main(["--strategies", "full,gsc", "--loss_type", "softmax,sigmoid", "--epochs", "1",
                          "--seeds", "0", "--max_train", "160", "--batch_size", "32", "--image_size", "16",
                          "--conv_channels", "8,16", "--hidden_size", "16", "--validation_fraction", "0.2",
                          "--output_dir", str(tmp_out)])
    assert [(r["loss_type"], r["strategy"]) for r in results] == [
        ("softmax", "full"), ("softmax", "gsc"), ("sigmoid", "full"), ("sigmoid", "gsc")]
    saved = json.loads((tmp_out / "results.json").read_text())
    assert saved["config"]["validation_fraction"] == 0.2
    assert {r["per_seed"][0]["optimizer_steps"] for r in results} == {160 // 32}  # max_train after the carve
    assert "| sigmoid | gsc |" in (tmp_out / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown loss_type"):
        bench.main(["--loss_type", "softmax,hinge", "--output_dir", str(tmp_out / "bad")])
