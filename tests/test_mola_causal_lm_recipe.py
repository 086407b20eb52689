"""``train_mola.py --model causal_lm``: MoLA-Grad vs one shared LoRA of the same budget on the easy-vqa text tasks."""

from __future__ import annotations

import json

import pytest
from _helpers import load_recipe


def test_causal_lm_recipe_trains_both_methods_with_equal_budget(tmp_path):
    recipe = load_recipe("train_mola")
    out = tmp_path / "run"
    result = recipe.main(["--model", "causal_lm", "--output_dir", str(out), "--max_steps", "3",
                          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
                          "--train_per_task", "16", "--test_per_task", "8", "--hidden_size", "16",
                          "--intermediate_size", "32", "--r", "2", "--report_to", "none", "--use_cpu", "true",
                          "--save_strategy", "no", "--disable_tqdm", "true"])
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["methods"].keys() == {"mola_grad", "lora_shared"} == result["methods"].keys()
    mola, lora = saved["methods"]["mola_grad"], saved["methods"]["lora_shared"]
    assert mola["trainable_params"] == lora["trainable_params"]  # E experts of rank r == one LoRA of rank E*r
    for method in (mola, lora):
        assert {"acc_color", "acc_shape", "acc_yes_no", "mean_acc", "loss"} <= set(method)
    assert json.loads((out / "mola_grad" / "adapter_config.json").read_text())["peft_type"] == "MOLA"
    assert json.loads((out / "lora_shared" / "adapter_config.json").read_text())["r"] == 6
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        recipe.main(["--model", "causal_lm", "--output_dir", str(out), "--max_steps", "1", "--use_cpu", "true"])
