"""Bad input fails in the first second as one line naming the fix, exit code 2 (issue 25): misspelled flags, paths
that look local but do not exist, wrong columns, used output folders, configs by name. Times: benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mmsel.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    return subprocess.run([sys.executable, "-m", "hf_mmsel", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def _one_line_error(capsys, command: str) -> str:
    text = capsys.readouterr().err.strip()
    err = text.splitlines()[-1]  # (progress bars of datasets may come before it)
    assert err.startswith(f"hf-mmsel {command}: error: ") and "Traceback" not in text, text
    return err


def test_misspelled_flag_is_one_line_with_close_matches(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MMSEL_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # first: the recipe's parser (and the flag list is cached); then: before any import
        assert main(["train-clip", "--max_stepz", "3"]) == 2
        err = _one_line_error(capsys, "train-clip")
        assert "--max_stepz (did you mean --max_steps" in err and "--max-steps" not in err
    assert list((tmp_path / "cache" / "help").glob("*.flags"))


def test_misspelled_flag_before_imports_in_a_fresh_process(tmp_path):
    env_cache = tmp_path / "cache"
    os.environ["HF_MMSEL_CACHE"] = str(env_cache)
    try:
        _run("train-mola", "--max_stepz", "3")  # fills the flag list
        out = subprocess.run([sys.executable, "-c", "import sys; from hf_mmsel.cli import main; code = main("
                              "['train-mola', '--lerning_rate', '1']); print(code, 'torch' in sys.modules, "
                              "'transformers' in sys.modules)"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": _pythonpath()})
    finally:
        del os.environ["HF_MMSEL_CACHE"]
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert "did you mean --learning_rate" in out.stderr


@pytest.mark.parametrize("flag", ["--dataset", "--model_name_or_path", "--vision_model"])
@pytest.mark.parametrize("value", ["./no_such_dir", "no_such_parent/x/", "/no/such/dir"])
def test_a_local_looking_path_that_does_not_exist_is_never_sent_to_the_hub(capsys, tmp_path, flag, value):
    assert main(["train-clip", flag, value, "--output_dir", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, "train-clip")
    assert f"{flag} {value!r}: no such" in err and "check the path" in err
    assert not (tmp_path / "out").exists()


def test_a_path_whose_parent_exists_is_local(capsys, tmp_path):
    assert main(["train-mola", "--model_name_or_path", str(tmp_path / "missing_model"),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "no such model folder" in _one_line_error(capsys, "train-mola")


def test_a_bare_name_offline_is_refused(capsys, tmp_path):
    assert main(["train-clip", "--dataset", "no_such_dir", "--output_dir", str(tmp_path / "out")]) == 2
    assert "HF_HUB_OFFLINE is set" in _one_line_error(capsys, "train-clip")


def test_each_source_of_a_multi_task_dataset_is_checked(capsys, tmp_path):
    assert main(["train-mola", "--dataset", f"a={tmp_path},b=./missing/", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--dataset './missing/': no such" in _one_line_error(capsys, "train-mola")


def test_used_output_folder_is_refused_in_one_line_by_every_recipe(capsys, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    for command in ("train-clip", "train-mola", "curate"):
        extra = ["--model_name_or_path", str(tmp_path)] if command == "curate" else []
        assert main([command, "--output_dir", str(tmp_path), *extra]) == 1  # (1: a used folder, not a usage error)
        assert "is not empty" in _one_line_error(capsys, command)


def test_curate_refusal_after_a_changed_run_is_one_line():
    from hf_mmsel.curation.outputs import prepare_curation_dir
    from hf_mmsel.errors import UsageError

    assert issubclass(__import__("hf_mmsel.recipes.run_utils", fromlist=["x"]).OutputDirExistsError, UsageError)
    assert prepare_curation_dir  # raises OutputDirExistsError (a UsageError): see test_curate


def test_wrong_caption_column_names_the_available_ones(capsys, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(data / f"{i}.png")
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,red {i}\n" for i in range(4)))
    assert main(["train-clip", "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--use_cpu",
                 "true"]) == 2
    err = _one_line_error(capsys, "train-clip")
    assert "column 'caption' (caption_column) not found" in err and "'text'" in err and "--caption_column" in err


def test_wrong_column_of_a_saved_dataset_is_named_right_after_loading(capsys, tmp_path):
    from datasets import Dataset
    from PIL import Image

    Dataset.from_dict({"img": [Image.new("RGB", (8, 8))] * 2, "text": ["a", "b"]}).save_to_disk(str(tmp_path / "d"))
    assert main(["train-clip", "--dataset", str(tmp_path / "d"), "--image_column", "img", "--output_dir",
                 str(tmp_path / "out"), "--use_cpu", "true"]) == 2
    err = _one_line_error(capsys, "train-clip")
    assert "column 'caption' (caption_column) not found in split 'train'" in err and "'text'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_hub_error_is_one_line(capsys, monkeypatch, tmp_path):
    from huggingface_hub.errors import HFValidationError

    monkeypatch.chdir(tmp_path)  # (the default output folder is relative)

    from hf_mmsel.recipes import train_clip

    def refuse(argv):
        raise HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': 'a/b/c'.")

    monkeypatch.setattr(train_clip, "main", refuse)
    assert main(["train-clip"]) == 1
    err = _one_line_error(capsys, "train-clip")
    assert "HFValidationError" in err and "check the Hub id" in err
    with pytest.raises(HFValidationError):
        main(["train-clip", "--debug"])


def test_debug_shows_the_traceback(tmp_path):
    from hf_mmsel.errors import UsageError

    with pytest.raises(UsageError):
        main(["train-clip", "--dataset", "./no_such_dir", "--debug"])


# ------------------------------------------------------------------------------------------ configs by name
def test_config_by_name_and_listing(capsys, tmp_path):
    from hf_mmsel.cli import CONFIGS_DIR, resolve_config

    assert resolve_config("clip_dissect") == CONFIGS_DIR / "clip_dissect.yaml"
    assert resolve_config("clip_dissect.yaml") == CONFIGS_DIR / "clip_dissect.yaml"
    assert resolve_config("recipes/configs/clip_gsc.yaml").name == "clip_gsc.yaml"  # README paths work anywhere
    own = tmp_path / "clip_dissect.yaml"
    own.write_text("max_steps: 3\n")
    assert resolve_config(str(own)) == own  # a path wins
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(p.stem in listing for p in CONFIGS_DIR.glob("*.yaml")) and "DISSect" in listing
    assert main(["train-clip", "--config", "clip_dissekt"]) == 2
    err = _one_line_error(capsys, "train-clip")
    assert "Did you mean 'clip_dissect'?" in err and "mola_default" in err


def test_config_by_name_parses_outside_a_checkout(tmp_path, monkeypatch):
    from hf_mmsel.recipes import train_clip

    monkeypatch.chdir(tmp_path)
    _, targs = train_clip.parse_args(["--config", "clip_dissect", "--use_cpu", "true"])
    assert targs.output_dir == "outputs/clip_dissect"


def test_two_readme_commands_run_from_a_folder_outside_the_repository(tmp_path):
    listed = _run("configs", cwd=tmp_path)
    assert listed.returncode == 0 and "clip_dissect" in listed.stdout, listed.stderr
    bad = _run("train-clip", "--config", "clip_dissect", "--dataset", "./mine", cwd=tmp_path)
    assert bad.returncode == 2 and "--dataset './mine': no such" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ CPU threads
def test_cpu_threads_flag_default_and_respect_for_omp(monkeypatch):
    import torch

    from hf_mmsel.cli import _pop_threads
    from hf_mmsel.errors import UsageError
    from hf_mmsel.recipes.run_utils import configure_cpu_threads, default_cpu_threads

    before = torch.get_num_threads()
    try:
        assert _pop_threads(["--max_steps", "3", "--threads", "2"]) == (["--max_steps", "3"], 2)
        assert _pop_threads(["--threads=3"]) == ([], 3)
        with pytest.raises(UsageError, match="--threads"):
            _pop_threads(["--threads", "0"])
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads(None, use_cpu=True) is None  # the user's OMP_NUM_THREADS is kept
        assert configure_cpu_threads(2, use_cpu=True) == 2 and torch.get_num_threads() == 2  # --threads wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert default_cpu_threads() == 1  # one per process under a multi-process launch
        assert configure_cpu_threads(None, use_cpu=True) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("WORLD_SIZE")
        assert 1 <= default_cpu_threads() <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_a_dataset_without_test_split_says_evaluation_is_skipped(capsys, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 255 - 30 * i)).save(data / f"{i}.png")
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,colour {i}\n" for i in range(8)))
    code = main(["train-clip", "--dataset", str(data), "--caption_column", "text", "--output_dir",
                 str(tmp_path / "out"), "--use_cpu", "true", "--max_steps", "1", "--per_device_train_batch_size", "4",
                 "--architecture", "small", "--selection_strategy", "full", "--report_to", "none",
                 "--save_strategy", "no"])
    assert code == 0
    assert "no test/validation split" in capsys.readouterr().out and (tmp_path / "out" / "metrics.json").is_file()


def test_dissect_warmup_advice_fits_the_setting():
    from hf_mmsel.state import PassSchedule

    with pytest.raises(ValueError, match="lower selection_warmup_passes or train more passes") as info:
        PassSchedule(batches_per_pass=4, total_batches=8).check_warmup(2)
    with pytest.raises(ValueError, match="train more passes / max_steps") as info:
        PassSchedule(batches_per_pass=4, total_batches=2).check_warmup(1)  # 1 is the minimum: nothing to lower
    assert "lower" not in str(info.value)


def test_causal_lm_help_is_not_cached_as_train_mola_help(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MMSEL_CACHE", str(tmp_path / "cache"))
    assert main(["train-mola", "--model", "causal_lm", "--help"]) == 0
    assert "--lm_kind" in capsys.readouterr().out
    assert main(["train-mola", "--help"]) == 0
    assert "--routing" in capsys.readouterr().out


def test_a_hub_id_fails_fast_when_the_hub_is_unreachable(capsys, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset on a machine without network: one short probe (mocked here) instead of the Hub
    client's retries, then one line naming the fix."""
    from hf_mmsel.recipes import run_utils

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(run_utils, "hub_reachable", lambda: probes.append(1) or False)
    assert main(["train-clip", "--dataset", "no_such_dir", "--output_dir", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, "train-clip")
    assert "--dataset 'no_such_dir' is neither a local folder nor an embedded dataset" in err
    assert "Hugging Face Hub is unreachable (offline?)" in err and probes == [1]
    assert main(["train-mola", "--model_name_or_path", "someone/vit", "--output_dir", str(tmp_path / "o2")]) == 2
    assert "--model_name_or_path 'someone/vit' is not a local model folder" in _one_line_error(capsys, "train-mola")
    monkeypatch.setattr(run_utils, "hub_reachable", lambda: True)  # reachable: the id goes to the Hub client
    run_utils.check_source("dataset", "someone/pairs", builtin=run_utils.BUILTIN_DATASETS)


def test_the_hub_probe_is_one_short_local_connection(monkeypatch):
    """hub_reachable: a closed port on this machine answers 'unreachable' at once; a proxy counts as reachable."""
    import socket
    import time

    from hf_mmsel.recipes import run_utils

    with socket.socket() as sock:  # a free loopback port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    run_utils.hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        assert run_utils.hub_reachable() is False and time.perf_counter() - start < run_utils.HUB_PROBE_TIMEOUT_S
        run_utils.hub_reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        assert run_utils.hub_reachable() is True
    finally:
        run_utils.hub_reachable.cache_clear()


def test_the_flag_checks_know_the_same_embedded_datasets_as_the_loader():
    """run_utils repeats the embedded dataset names so that checking flags imports no data code: they must agree."""
    from hf_mmsel.data import EMBEDDED_IMAGE_TEXT_DATASETS
    from hf_mmsel.recipes import run_utils

    assert run_utils.EMBEDDED_DATASETS == EMBEDDED_IMAGE_TEXT_DATASETS
    assert set(EMBEDDED_IMAGE_TEXT_DATASETS) <= run_utils.BUILTIN_DATASETS
