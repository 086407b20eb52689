"""recipes/train_mola.py end to end: YAML + flags, artefacts, push to the fake Hub and reload, 2-process CPU run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from _helpers import accelerate_launch, load_recipe, run_checked

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_mola.py"
SMALL = ["--max_per_task", "60", "--hidden_size", "16", "--num_hidden_layers", "1", "--intermediate_size", "32",
         "--r", "2", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--logging_steps", "2",
         "--disable_tqdm", "true"]


def _load_recipe():
    return load_recipe("train_mola")


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


def test_card_has_one_correct_loading_section(tmp_path):
    from hf_mmsel.data.multitask import MultiTaskSpec

    recipe = _load_recipe()
    model_args, _, _ = recipe.parse_args([])
    spec = MultiTaskSpec(["a", "b"], [3, 2])
    results = {"acc_a": 0.5, "acc_b": 0.25, "mean_acc": 0.375}
    recipe.write_card(str(tmp_path), adapter_id="tester/mola-x", on_hub=True, model_args=model_args, spec=spec,
                      results=results, trainable_params=10, hardware="CPU, 1 process(es)")
    card = (tmp_path / "README.md").read_text()
    assert card.count("## How to load") == 1
    section = card.split("## How to load", 1)[1].split("## Export", 1)[0]
    assert section.count("```python") == 1
    assert "AutoModel" not in card  # the base is not a transformers Hub model
    assert 'snapshot_download("tester/mola-x")' in section and "load_multitask_vit" in section
    assert section.index("import hf_mmsel") < section.index("PeftModel.from_pretrained")
    assert "export_expert_as_lora(task_id=0" in card.split("## Export", 1)[1]

    local = tmp_path / "local"
    local.mkdir()
    recipe.write_card(str(local), adapter_id=str(local), on_hub=False, model_args=model_args, spec=spec,
                      results=results, trainable_params=10, hardware="CPU, 1 process(es)")
    section = (local / "README.md").read_text().split("## How to load", 1)[1].split("## Export", 1)[0]
    assert f'path = "{local}"' in section and "snapshot_download(" not in section.replace(
        "snapshot_download(repo_id)", "")


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
    run_checked([sys.executable, str(RECIPE), "--output_dir", str(tmp_out), "--max_steps", "6", *SMALL,
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
    run_checked([*accelerate_launch(2), str(RECIPE), "--use_cpu", "true", "--output_dir", str(tmp_out), "--max_steps", "4", "--routing", "router", *SMALL])
    results = json.loads((tmp_out / "eval_results.json").read_text())
    assert results["world_size"] == 2 and results["routing"] == "router" and results["global_step"] == 4
    assert json.loads((tmp_out / "adapter_config.json").read_text())["routing"] == "router"


def _load_benchmark():
    return load_recipe("benchmark_mola")


def test_benchmark_selects_learning_rate_on_validation_not_test():
    bench = _load_benchmark()
    args = bench.parse_args(["--seeds", "0,1", "--learning_rates", "1e-3,3e-3", "1e-2"])
    assert args.seeds == [0, 1] and args.learning_rates == [1e-3, 3e-3, 1e-2]
    runs = [  # lr 1e-3 is best on validation, 3e-3 on test: the choice must follow validation
        {"method": "m", "seed": s, "learning_rate": lr, "val_mean_acc": v, "test_mean_acc": t}
        for s in (0, 1) for lr, v, t in ((1e-3, 0.75, 0.5), (3e-3, 0.625, 0.9), (1e-2, 0.5 + 0.25 * s, 0.9))
    ]
    assert bench.select_learning_rates(runs, ["m"]) == {"m": 1e-3}
    tie = [dict(r, method="t", val_mean_acc=0.5) for r in runs]
    assert bench.select_learning_rates(tie, ["t"]) == {"t": 1e-3}  # ties -> the smaller learning rate


@pytest.mark.slow
def test_benchmark_smoke_writes_results(tmp_path):
    bench = _load_benchmark()
    payload = bench.main(["--methods", "lora_shared", "mola_grad", "--seeds", "0", "--learning_rates", "1e-3,1e-2",
                          "--max_steps", "3", "--max_per_task", "40", "--hidden_size", "16", "--num_hidden_layers",
                          "1", "--r", "2", "--batch_size", "8", "--timing_steps", "1", "--output_dir", str(tmp_path)])
    assert {"results.json", "results.md", "results.png"} <= {p.name for p in tmp_path.iterdir()}
    sizes = payload["split_sizes"]
    assert sizes["validation"] > 0 and sizes["train"] > sizes["validation"]
    assert len(payload["runs"]) == 4  # 2 methods x 2 learning rates x 1 seed
    summary = payload["summary"]
    assert summary["lora_shared"]["trainable_params"] == summary["mola_grad"]["trainable_params"]  # same budget
    for method, s in summary.items():
        assert s["learning_rate"] in (1e-3, 1e-2)
        best = max(s["val_mean_acc_by_lr"].values())
        assert s["val_mean_acc_by_lr"][f"{s['learning_rate']:g}"] == best
    assert set(payload["median_step_time_ms"]) == {"lora_shared", "mola_grad"}
    assert "mola_grad" in (tmp_path / "results.md").read_text()
