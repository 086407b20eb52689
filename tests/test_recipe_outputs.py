"""What a user sees after a recipe run: the end-of-run summary on stdout, a card with the real steps/epochs and
method, a tokenizer and image processor next to the model, and a card snippet that runs as written."""

from __future__ import annotations

import json
import re

import pytest

from _helpers import load_recipe

TINY_CLIP = ["--max_train", "64", "--max_test", "32", "--per_device_train_batch_size", "16", "--image_size", "16",
             "--patch_size", "8", "--hidden_size", "32", "--save_strategy", "no", "--use_cpu", "true"]


def _card_snippet(card: str) -> str:
    return card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_train_clip_summary_card_and_preprocessing(tmp_out, capsys):
    from transformers import AutoTokenizer, CLIPImageProcessor

    train_clip = load_recipe("train_clip")
    train_clip.main(["--output_dir", str(tmp_out), "--max_steps", "5", "--selection_strategy", "dissect",
                     "--selection_warmup_epochs", "1", *TINY_CLIP])
    out = capsys.readouterr().out
    assert "***** train-clip: dissect finished *****" in out and "eval_rsum" in out
    assert str(tmp_out / "README.md") in out and "AutoModel.from_pretrained" in out
    assert "'loss': '" not in out
    card = (tmp_out / "README.md").read_text()
    assert f"# {tmp_out.name}" in card and "license: apache-2.0" in card
    assert "| optimizer steps | 5 |" in card and "| epochs | 1.25 |" in card  # 5 steps x 16 of 64 pairs
    assert "trained with **dissect**" in card  # 1.25 epochs > the 1-epoch warm-up: DISSect did select
    assert "rsum" in card and "noisy-correspondence rate" not in card.lower()  # no noise was injected
    processor = CLIPImageProcessor.from_pretrained(str(tmp_out))
    assert processor.crop_size == {"height": 16, "width": 16}
    assert AutoTokenizer.from_pretrained(str(tmp_out)).eos_token == "</s>"
    exec(compile(_card_snippet(card).replace(f'"{tmp_out.name}"', f'"{tmp_out}"'), "card", "exec"), {})
    assert re.search(r"^-?\d\.\d+", capsys.readouterr().out.strip().splitlines()[-1])


def test_clip_card_names_the_method_that_actually_ran():
    from types import SimpleNamespace

    train_clip = load_recipe("train_clip")
    args, targs = train_clip.parse_args(["--selection_strategy", "dissect", "--selection_warmup_epochs", "2",
                                         "--max_steps", "20", "--use_cpu", "true"])
    card = train_clip._card(args, targs, {}, SimpleNamespace(epoch=1.5, global_step=20)).content
    assert "random selection (DISSect's 2-epoch warm-up covered all 1.5 epochs run)" in card
    assert "| optimizer steps | 20 |" in card and "| epochs | 1.5 |" in card and "3.0" not in card


@pytest.mark.slow
def test_train_clip_gsc_co_training_builds_two_networks(tmp_out, capsys):
    from hf_mmsel.models import CoTrainedDualEncoder

    load_recipe("train_clip").main(["--output_dir", str(tmp_out), "--max_steps", "4", "--selection_strategy", "full",
                                    "--gsc", "true", "--gsc_co_training", "true", "--noise_ratio", "0.4", *TINY_CLIP])
    out = capsys.readouterr().out
    assert "gsc (GSC+, two networks) finished" in out and "CoTrainedDualEncoder.from_pretrained" in out
    model = CoTrainedDualEncoder.from_pretrained(str(tmp_out))
    assert len(model.networks) == 2
    a, b = (dict(n.named_parameters()) for n in model.networks)
    assert any(not (a[k] == b[k]).all() for k in a)  # two differently initialised networks
    card = (tmp_out / "README.md").read_text()
    assert "40.0 %" in card and "GSC+" in card
    exec(compile(_card_snippet(card).replace(f'"{tmp_out.name}"', f'"{tmp_out}"'), "card", "exec"), {})


@pytest.mark.slow
def test_train_mola_on_a_users_dataset_and_local_vit(tmp_path, capsys):
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "tiny-vit"
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(str(vit))
    rng = np.random.default_rng(0)

    def images(n):
        return [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]

    datasets.Dataset.from_dict({"image": images(30), "label": [i % 3 for i in range(30)]}).save_to_disk(
        str(tmp_path / "a"))
    datasets.Dataset.from_dict({"img": images(40), "y": [(i // 2) % 2 for i in range(40)],
                                "task": ["color", "shape"] * 20}).save_to_disk(str(tmp_path / "mt"))
    recipe = load_recipe("train_mola")
    common = ["--model_name_or_path", str(vit), "--max_steps", "3", "--per_device_train_batch_size", "8",
              "--logging_steps", "1", "--image_mean", "0.5,0.5,0.5", "--image_std", "0.5,0.5,0.5"]  # no processor
    results = recipe.main(["--dataset", f"first={tmp_path / 'a'},second={tmp_path / 'a'}", "--target_modules",
                           "q_proj,v_proj", "--output_dir", str(tmp_path / "o1"), *common])
    assert results["task_names"] == ["first", "second"] and results["num_labels"] == [3, 3]
    config = json.loads((tmp_path / "o1" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    out = capsys.readouterr().out
    assert "***** train-mola: MoLA-Grad finished *****" in out and "eval_acc_second" in out
    card = (tmp_path / "o1" / "README.md").read_text()
    assert str(vit) in card and "| optimizer steps | 3 |" in card and "license: apache-2.0" in card

    results = recipe.main(["--dataset", str(tmp_path / "mt"), "--task_column", "task", "--image_column", "img",
                           "--label_column", "y", "--output_dir", str(tmp_path / "o2"), *common])
    assert results["task_names"] == ["color", "shape"] and results["num_labels"] == [2, 2]
    with pytest.raises(ValueError, match="match no module"):
        recipe.main(["--dataset", str(tmp_path / "a"), "--target_modules", "query", "--output_dir",
                     str(tmp_path / "o3"), *common])
