"""The hf-mmsel dispatcher, the shared recipe rules (output folder, no noise by default, flag styles) and the
light `import hf_mmsel` (MoLA registered by a post-import hook on peft)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from _helpers import load_recipe

from hf_mmsel.recipes.run_utils import OutputDirExistsError, prepare_output_dir


def test_dispatcher_lists_commands_and_rejects_unknown(capsys):
    from hf_mmsel.cli import COMMANDS, main

    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert main(["train-mloa"]) == 2 and "Did you mean 'train-mola'" in capsys.readouterr().err


def test_prepare_output_dir_refuses_unless_asked(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(out)  # missing -> created
    (out / "model.safetensors").write_text("old")
    with pytest.raises(OutputDirExistsError, match="--overwrite_output_dir"):
        prepare_output_dir(out)
    prepare_output_dir(out, overwrite_output_dir=True)
    prepare_output_dir(out, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert (out / "model.safetensors").read_text() == "old"  # nothing deleted


def test_train_clip_refuses_a_used_folder_before_any_work(tmp_out):
    (tmp_out / "README.md").write_text("a previous run")
    with pytest.raises(OutputDirExistsError):
        load_recipe("train_clip").main(["--output_dir", str(tmp_out), "--use_cpu", "true"])
    assert (tmp_out / "README.md").read_text() == "a previous run"


def test_no_shipped_config_injects_noise():
    from importlib import resources

    folder = resources.files("hf_mmsel.recipes") / "configs"
    checked = 0
    for path in folder.iterdir():
        if path.name.endswith(".yaml") and path.name != "curate_default.yaml":  # curate: branch `shards`
            assert not (yaml.safe_load(path.read_text()) or {}).get("noise_ratio"), path.name
            checked += 1
    assert checked >= 5
    clip_args, _ = load_recipe("train_clip").parse_args(["--use_cpu", "true"])
    assert clip_args.noise_ratio == 0.0
    from hf_mmsel.recipes.benchmark_selection import BenchmarkArguments

    assert BenchmarkArguments().noise_ratio == 0.0 and BenchmarkArguments().output_dir.startswith("outputs/")


def test_flag_styles_and_default_output_root():
    bench = load_recipe("benchmark_mola")
    args = bench.parse_args(["--methods", "mola_grad,lora_shared"])
    assert args.methods == ["mola_grad", "lora_shared"] and args.output_dir == "outputs/benchmark-mola"
    assert bench.parse_args(["--methods", "full", "mola_grad"]).methods == ["full", "mola_grad"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "mola_grad,nope"])
    _, targs = load_recipe("train_clip").parse_args(["--use_cpu", "true"])
    assert targs.output_dir == "outputs/train-clip" and targs.dataloader_pin_memory is False
    model_args, _, training_args = load_recipe("train_mola").parse_args(["--target_modules", "q_proj,v_proj"])
    assert model_args.target_modules == ["q_proj", "v_proj"]
    _, targs = load_recipe("train_clip").parse_args(["--use_cpu", "true", "--report_to", "tensorboard"])
    assert targs.report_to == ["tensorboard"]  # passed through unchanged


def test_push_needs_the_repo_id_everywhere():
    from hf_mmsel.recipes.run_utils import check_push_settings

    with pytest.raises(ValueError, match="--hub_model_id"):
        check_push_settings(None)
    with pytest.raises(ValueError, match="--hub_model_id"):
        load_recipe("train_clip").main(["--push_to_hub", "true", "--use_cpu", "true", "--output_dir", "/nonexistent"])


def test_progress_logs_numbers_not_strings(capsys):
    from types import SimpleNamespace

    from hf_mmsel.trainers.logging_defaults import NumericProgressCallback

    callback = NumericProgressCallback()
    callback.training_bar = SimpleNamespace(write=print)
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True), None, logs={"loss": 7.56712, "step": 3})
    assert capsys.readouterr().out.strip() == "{'loss': 7.567, 'step': 3}"


def test_import_hf_mmsel_is_light_and_registers_on_peft_import():
    code = ("import sys, hf_mmsel\n"
            "assert 'peft' not in sys.modules and 'torch' not in sys.modules\n"
            "import importlib.util; assert importlib.util.find_spec('peft')  # a probe (transformers does it)\n"
            "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
            "print(PEFT_TYPE_TO_CONFIG_MAPPING['MOLA'].__name__)\n")
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {sys.path!r}\n" + code],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "MolaConfig", out.stderr[-2000:]


def test_preset_gives_the_recommended_settings_and_explicit_flags_win(capsys):
    """--preset NAME = --config <packaged NAME.yaml>: its values replace the bare defaults (batch 8, lr 5e-5, 3 epochs),
    flags given beside it win."""
    from hf_mmsel.cli import main
    from hf_mmsel.errors import UsageError

    train_clip = load_recipe("train_clip")
    bare_args, bare = train_clip.parse_args(["--use_cpu", "true"])
    args, targs = train_clip.parse_args(["--preset", "clip_dissect", "--use_cpu", "true", "--learning_rate", "1e-4",
                                         "--num_train_epochs", "8"])
    assert (bare.per_device_train_batch_size, bare.learning_rate, bare.num_train_epochs) == (8, 5e-5, 3)
    assert targs.per_device_train_batch_size == 128 and targs.selection_warmup_passes == 5  # from the preset
    assert targs.output_dir == "outputs/clip_dissect" and args.image_size == 28
    assert targs.learning_rate == 1e-4 and targs.num_train_epochs == 8  # explicit flags win
    _, same = train_clip.parse_args(["--preset=clip_dissect", "--use_cpu", "true"])
    _, by_config = train_clip.parse_args(["--config", "clip_dissect", "--use_cpu", "true"])
    assert same.learning_rate == by_config.learning_rate == 0.002
    with pytest.raises(UsageError, match="Did you mean 'clip_dissect'"):
        train_clip.parse_args(["--preset", "clip_dissekt"])
    with pytest.raises(UsageError, match="not both"):
        train_clip.parse_args(["--preset", "clip_dissect", "--config", "clip_gsc"])
    assert main(["train-clip", "--preset", "my_file.yaml"]) == 2
    assert "no packaged config of that name" in capsys.readouterr().err
