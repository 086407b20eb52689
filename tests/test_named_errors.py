"""Bad inputs that used to pass silently raise named errors that say what is wrong and how to fix it (issue 20)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _helpers import load_recipe

TESTS_DIR = str(Path(__file__).resolve().parent)


# ----------------------------------------------------------------------------------- duplicate sample_idx
def test_check_unique_sample_idx_names_the_duplicates_and_the_fix():
    from hf_mmsel.state import check_unique_sample_idx

    check_unique_sample_idx(torch.tensor([3, 0, 2, 1]))  # unique, any order: fine
    ids = torch.cat([torch.arange(10), torch.arange(10)])
    with pytest.raises(ValueError, match=r"duplicate sample_idx.*10 id\(s\) occur more than once \(0, 1, 2, 3, 4, "
                                         r"\.\.\.; 10 extra row\(s\)\)") as info:
        check_unique_sample_idx(ids)
    assert 'dataset.map(lambda _, i: {"sample_idx": i}, with_indices=True)' in str(info.value)


def test_trainer_refuses_concatenated_datasets_with_shared_sample_idx(tmp_out):
    from datasets import concatenate_datasets
    from test_contrastive_trainer import _args, _bundle, _dataset

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer

    bundle = _bundle()
    part = _dataset(bundle.tokenizer, 32)
    doubled = concatenate_datasets([part, _dataset(bundle.tokenizer, 32, seed=1)]).with_format("torch")

    def trainer(ds):
        return ContrastiveTrainer(bundle.model, _args(tmp_out), train_dataset=ds,
                                  data_collator=ImageTextCollator(bundle.tokenizer, max_length=12),
                                  processing_class=bundle.tokenizer)

    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train_dataset has duplicate sample_idx values: 32 id\(s\).*\(0, 1, 2, 3, "
                                         r"4, \.\.\.; 32 extra row\(s\)\).*with_indices=True"):
        trainer(doubled).train()
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())  # refused before any step
    renumbered = doubled.map(lambda _, i: {"sample_idx": i}, with_indices=True)
    assert len(trainer(renumbered)._get_train_sampler()) == 64 // 16  # the suggested fix is accepted


# ------------------------------------------------------------------------------ peft registration failure
FAILED_REGISTRATION = """
import json, pathlib, warnings
import torch
import hf_mmsel._peft_hook as hook

assert hook.installed(), "the start-up hook (or import hf_mmsel) waits for peft"
real = hook._import_mola

def boom():
    raise RuntimeError("simulated registration failure 1234")

hook._import_mola = boom
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft  # must not crash
print("WARNED", any("simulated registration failure 1234" in str(w.message) for w in caught))
from peft import PeftConfig, PeftModel

folder = pathlib.Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
(folder / "adapter_config.json").write_text(json.dumps({"peft_type": "MOLA", "r": 2, "num_experts": 2}))
for name, load in (("config", lambda: PeftConfig.from_pretrained(str(folder))),
                   ("model", lambda: PeftModel.from_pretrained(torch.nn.Linear(2, 2), str(folder)))):
    try:
        load()
        print(name, "NO_ERROR")
    except Exception as err:
        print(name, "ERROR", type(err).__name__, "|", err, "| CAUSE", repr(err.__cause__))
hook._import_mola = real  # the cause is fixed: an explicit import registers MoLA for real
import hf_mmsel.mola
from hf_mmsel.mola import MolaConfig

MolaConfig(r=2, num_experts=2, target_modules=["0"]).save_pretrained(str(folder / "fixed"))
print("RECOVERED", type(PeftConfig.from_pretrained(str(folder / "fixed"))).__name__)
"""


def test_failed_peft_registration_raises_with_its_cause_on_use(tmp_path):
    import os

    code = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n" + textwrap.dedent(FAILED_REGISTRATION)
    env = {k: v for k, v in os.environ.items() if k != "HF_MMSEL_NO_PEFT_HOOK"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter")], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # `import peft` itself did not crash
    out = proc.stdout
    assert "WARNED True" in out
    for name in ("config", "model"):
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert line.startswith(f"{name} ERROR MolaRegistrationError"), line
        assert "MoLA registration failed" in line and "simulated registration failure 1234" in line
        assert "CAUSE RuntimeError('simulated registration failure 1234')" in line
    assert "RECOVERED MolaConfig" in out


# ------------------------------------------------------------------------ image processor of a model folder
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP saved with its tokenizer but without preprocessor_config.json."""
    from hf_mmsel.models import build_dual_encoder

    bundle = build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                projection_dim=16, max_length=12, seed=0)
    folder = tmp_path_factory.mktemp("clip_no_processor")
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    return folder


def test_model_folder_without_image_processor_needs_explicit_normalisation(clip_folder, tmp_path):
    import shutil

    from hf_mmsel.data import CLIP_MEAN
    from hf_mmsel.models import MissingImageProcessorError, build_dual_encoder

    with pytest.raises(MissingImageProcessorError, match=r"preprocessor_config.json is missing from the folder "
                                                         r".*clip_no_processor.*image_mean=.*image_std=") as info:
        build_dual_encoder(model_name_or_path=clip_folder)
    assert isinstance(info.value, ValueError) and "--image_mean / --image_std" in str(info.value)
    assert "vision config (16 px)" in str(info.value)
    with pytest.raises(MissingImageProcessorError, match=r"\(the vision_model\)"):
        build_dual_encoder(vision_model=clip_folder, text_model=clip_folder, projection_dim=8)
    with pytest.raises(ValueError, match="give both image_mean and image_std"):
        build_dual_encoder(model_name_or_path=clip_folder, image_mean="0.5,0.5,0.5")
    with pytest.raises(ValueError, match="3 channel values"):
        build_dual_encoder(model_name_or_path=clip_folder, image_mean="0.5,0.5", image_std="0.5,0.5")

    explicit = build_dual_encoder(model_name_or_path=clip_folder, image_mean="0.5,0.5,0.5", image_std=[0.25] * 3)
    assert explicit.image_transform.mean == (0.5,) * 3 and explicit.image_transform.std == (0.25,) * 3
    assert explicit.image_transform.size == (16, 16)  # from the vision config

    # a folder that has the file keeps its processor's settings; explicit values replace only mean / std
    with_processor = tmp_path / "with_processor"
    shutil.copytree(clip_folder, with_processor)
    explicit.image_transform.to_image_processor().save_pretrained(with_processor)
    loaded = build_dual_encoder(model_name_or_path=with_processor)
    assert loaded.image_transform == explicit.image_transform
    override = build_dual_encoder(model_name_or_path=with_processor, image_mean=CLIP_MEAN, image_std=[0.5] * 3)
    assert override.image_transform.mean == CLIP_MEAN and override.image_transform.size == (16, 16)

    # random-init models: CLIP's normalisation unless given
    tiny = dict(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, projection_dim=16)
    assert build_dual_encoder(**tiny).image_transform.mean == CLIP_MEAN
    assert build_dual_encoder(**tiny, image_mean=0.5, image_std=0.5).image_transform.std == (0.5,) * 3


def test_train_clip_image_mean_and_std_flags(clip_folder):
    recipe = load_recipe("train_clip")
    args, _ = recipe.parse_args(["--model_name_or_path", str(clip_folder), "--use_cpu", "true"])
    with pytest.raises(ValueError, match="preprocessor_config.json.*--image_mean / --image_std"):
        recipe._build_model(args, captions=None)
    args, _ = recipe.parse_args(["--model_name_or_path", str(clip_folder), "--use_cpu", "true",
                                 "--image_mean", "0.5,0.5,0.5", "--image_std", "0.2,0.2,0.2"])
    assert args.image_mean == "0.5,0.5,0.5"
    transform = recipe._build_model(args, captions=None).image_transform
    assert transform.mean == (0.5,) * 3 and transform.std == (0.2,) * 3


# ------------------------------------------------------------------------------------ train-mola backbone
@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("vit_no_processor")
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(str(folder))
    return folder


def test_train_mola_backbone_without_image_processor_needs_the_flags(vit_folder, tmp_path):
    from transformers import ViTImageProcessor

    from hf_mmsel.models import MissingImageProcessorError

    recipe = load_recipe("train_mola")
    with pytest.raises(MissingImageProcessorError, match=r"vit_no_processor.*preprocessor_config.json.*"
                                                         r"--image_mean / --image_std"):
        recipe.backbone_image_settings(str(vit_folder), 28)
    out = tmp_path / "out"
    with pytest.raises(MissingImageProcessorError, match="preprocessor_config.json"):
        recipe.main(["--model_name_or_path", str(vit_folder), "--dataset", str(tmp_path / "data"),
                     "--output_dir", str(out), "--max_steps", "1"])
    assert not out.exists()  # refused before any work
    settings = recipe.backbone_image_settings(str(vit_folder), 28, "0.1,0.2,0.3", "0.5")
    assert settings == {"image_size": 16, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}

    processor_folder = tmp_path / "vit_with_processor"
    processor_folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (processor_folder / name).write_bytes((vit_folder / name).read_bytes())
    ViTImageProcessor(image_mean=[0.4] * 3, image_std=[0.3] * 3).save_pretrained(processor_folder)
    assert recipe.backbone_image_settings(str(processor_folder), 28) == {"image_size": 16, "mean": [0.4] * 3,
                                                                          "std": [0.3] * 3}
    model_args, data_args, _ = recipe.parse_args(["--image_mean", "0.5,0.5,0.5", "--image_std", "0.5,0.5,0.5"])
    with pytest.raises(ValueError, match="embedded benchmark is normalised with mean = std = 0.5"):
        recipe.image_settings(data_args, model_args)
    model_args, data_args, _ = recipe.parse_args(["--dataset", "somewhere"])
    assert recipe.image_settings(data_args, model_args) == {"image_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3}


# ----------------------------------------------------------------------------- benchmark-mola-step output
TINY_STEP = ["--mode", "train", "--dim", "8", "--num_layers", "1", "--batch_size", "4", "--rank", "2",
             "--num_experts", "2", "--steps", "1"]


def test_benchmark_mola_step_writes_to_output_dir_and_refuses_a_used_one(tmp_path):
    from hf_mmsel.recipes.run_utils import OutputDirExistsError

    recipe = load_recipe("benchmark_mola_step")
    assert recipe.DEFAULT_OUTPUT_DIR == "outputs/benchmark-mola-step"
    out = tmp_path / "step"
    result = recipe.main([*TINY_STEP, "--output_dir", str(out)])
    assert json.loads((out / "results.json").read_text())["num_experts"] == result["num_experts"] == 2
    assert "| MoLA-Grad / LoRA step time |" in (out / "results.md").read_text()
    with pytest.raises(OutputDirExistsError, match=r"not empty.*--overwrite_output_dir true"):
        recipe.main([*TINY_STEP, "--output_dir", str(out)])
    (out / "notes.txt").write_text("mine")
    recipe.main([*TINY_STEP, "--output_dir", str(out), "--overwrite_output_dir", "true"])
    assert (out / "notes.txt").read_text() == "mine"  # only the files this run writes are replaced
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "results.md"]
