"""recipes/train_mola.py end to end: YAML + flags, artefacts, push to the fake Hub and reload, 2-process CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_mola.py"
SMALL = ["--max_per_task", "60", "--hidden_size", "16", "--num_hidden_layers", "1", "--intermediate_size", "32",
         "--r", "2", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--logging_steps", "2",
         "--disable_tqdm", "true"]


def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mola_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_yaml_defaults_flags_override_and_unknown_keys(tmp_path):
    recipe = _load_recipe()
    model_args, data_args, training_args = recipe.parse_args([])
    assert model_args.routing == "task" and training_args.output_dir == "outputs/mola"
    assert training_args.remove_unused_columns is False and training_args.use_cpu is True
    config = tmp_path / "c.yaml"
    config.write_text("routing: router\nmax_steps: 7\nlearning_rate: 0.01\nimage_size: 20\n")
    model_args, data_args, training_args = recipe.parse_args(["--config", str(config), "--max_steps", "3"])
    assert model_args.routing == "router" and data_args.image_size == 20
    assert training_args.max_steps == 3 and training_args.learning_rate == 0.01  # flag beats YAML
    config.write_text("rouitng: router\n")
    with pytest.raises(ValueError, match=r"unknown settings \['rouitng'\]"):
        recipe.parse_args(["--config", str(config)])


def _eval_accuracy(model, data, spec) -> dict:
    from hf_mmsel.metrics import multitask_accuracy

    test = data["test"]
    with torch.no_grad():
        logits = model(pixel_values=test["pixel_values"][:], task_ids=test["task_id"][:]).logits
    return multitask_accuracy(logits, test["label"][:], test["task_id"][:], spec.task_names)


@pytest.mark.slow
def test_train_writes_artifacts_pushes_and_reloads_bit_exact(tmp_out, fake_hub):
    from huggingface_hub import snapshot_download
    from peft import PeftModel

    import hf_mmsel  # noqa: F401  (registers MOLA before loading)
    from hf_mmsel.data.multitask import load_multitask_benchmark
    from hf_mmsel.models.multitask import load_multitask_vit

    repo_id = "tester/mola-tiny"
    _run([sys.executable, str(RECIPE), "--output_dir", str(tmp_out), "--max_steps", "6", *SMALL,
          "--push_to_hub", "--hub_model_id", repo_id])

    adapter_config = json.loads((tmp_out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "MOLA" and adapter_config["routing"] == "task"
    assert (tmp_out / "adapter_model.safetensors").stat().st_size > 0
    results = json.loads((tmp_out / "eval_results.json").read_text())
    task_names = ["digits_sklearn", "digits_mnist", "easy_vqa_color", "easy_vqa_shape"]
    assert results["world_size"] == 1 and results["global_step"] == 6
    assert set(f"acc_{n}" for n in task_names) | {"mean_acc"} <= set(results)
    card = (tmp_out / "README.md").read_text()
    assert "library_name: hf_mmsel" in card and all(n in card for n in task_names)
    assert f"{results['acc_easy_vqa_shape']:.4f}" in card and "load_multitask_vit" in card

    pushed = set(fake_hub.list_repo_files(repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "eval_results.json",
            "base_model/model.safetensors", "base_model/multitask_config.json"} <= pushed
    assert not any(f.endswith("training_args.bin") for f in pushed)

    data, spec = load_multitask_benchmark(max_per_task=60)
    local = PeftModel.from_pretrained(load_multitask_vit(str(tmp_out / "base_model")), str(tmp_out)).eval()
    snapshot = snapshot_download(repo_id)
    from_hub = PeftModel.from_pretrained(load_multitask_vit(os.path.join(snapshot, "base_model")), repo_id).eval()
    x, t = data["test"]["pixel_values"][:32], data["test"]["task_id"][:32]
    with torch.no_grad():
        assert torch.equal(local(pixel_values=x, task_ids=t).logits, from_hub(pixel_values=x, task_ids=t).logits)
    # the reloaded adapter reproduces the accuracy the training run reported
    reproduced = _eval_accuracy(from_hub, data, spec)
    for key, value in reproduced.items():
        assert value == pytest.approx(results[key], abs=1e-9), key


@pytest.mark.slow
def test_two_process_cpu_run_with_router(tmp_out):
    accelerate = Path(sys.executable).parent / "accelerate"
    _run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(RECIPE), "--use_cpu",
          "true", "--output_dir", str(tmp_out), "--max_steps", "4", "--routing", "router", *SMALL])
    results = json.loads((tmp_out / "eval_results.json").read_text())
    assert results["world_size"] == 2 and results["routing"] == "router" and results["global_step"] == 4
    assert json.loads((tmp_out / "adapter_config.json").read_text())["routing"] == "router"
