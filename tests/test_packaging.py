"""The wheel maps trainers/ -> hf_mmsel.trainers and model_cards/ -> hf_mmsel.model_cards (package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARDS = ("contrastive_model_card.md", "mola_adapter_card.md", "curated_dataset_card.md")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the wheel from a copy of the sources (keeps build/ out of the shared checkout) and install it
    into a throw-away ``--target`` directory."""
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("hf_mmsel", "trainers", "model_cards"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "setup.py", "hf_mmsel_peft_hook.pth"):
        shutil.copy2(ROOT / name, src / name)
    if find_spec("setuptools.command.bdist_wheel") is None and find_spec("wheel") is None:
        pytest.skip("building a wheel needs setuptools>=70.1 (or the wheel package) in this environment; "
                    'pip install -e ".[test]" brings it')
    dist = work / "dist"
    # -x: setuptools is what the build needs; the `wheel` package named in build-system.requires is optional
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-x", "--outdir", str(dist),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("hf_mmsel-*.whl")
    target = work / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, text=True)
    return wheel, target


def test_wheel_contents(built):
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_mmsel/__init__.py" in names
    assert "hf_mmsel/trainers/__init__.py" in names
    assert "hf_mmsel/models/builder.py" in names and "hf_mmsel/metrics/modules.py" in names
    assert "hf_mmsel/curation/pipeline.py" in names and "hf_mmsel/data/shards.py" in names
    for card in CARDS:
        assert f"hf_mmsel/model_cards/{card}" in names
    top_level = {n.split("/")[0] for n in names}
    assert "hf_mmsel_peft_hook.pth" in names  # site-packages root: registers MoLA when peft is imported
    assert top_level <= {"hf_mmsel", "hf_mmsel_peft_hook.pth"} | {n.split("/")[0] for n in names
                                                                  if ".dist-info/" in n}, top_level
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hf-mmsel = hf_mmsel.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not ({"trainers", "model_cards", "tests", "recipes"} & top_level)


def test_installed_copy_renders_a_card(built):
    _, target = built
    assert (target / "hf_mmsel" / "model_cards" / "mola_adapter_card.md").is_file()
    assert not (target / "trainers").exists() and not (target / "model_cards").exists()
    code = (
        "import hf_mmsel, hf_mmsel.trainers, hf_mmsel.model_cards\n"
        "from hf_mmsel.hub import render_card\n"
        "card = render_card('mola_adapter_card', adapter_id='t/a', base_model='tiny', tasks=['x'])\n"
        "print(hf_mmsel.__file__); print(hf_mmsel.trainers.__file__); print(card.data.library_name)\n"
        "print('| 0 | x |' in card.content)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         cwd=str(target)).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))  # the built copy, not the checkout
    assert out[2:] == ["hf_mmsel", "True"]


def test_import_package_and_trainers():
    code = "import hf_mmsel, hf_mmsel.trainers; print(hf_mmsel.__version__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/")
    assert out.stdout.strip()


@pytest.fixture(scope="module")
def wheel_venv(built, tmp_path_factory):
    """A throw-away venv with the wheel installed (``pip install --no-deps``) and this venv's packages visible
    through a plain path .pth (so the checkout's editable install and its hooks are NOT active there)."""
    wheel, _ = built
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    # every site-packages folder this interpreter sees (its own, and those a layered venv adds through a .pth; CI's
    # .venv lies inside the checkout): added as plain paths, their .pth files (the editable install's finder) are
    # not processed, so the checkout stays invisible and the wheel's copy, first on sys.path, is what runs
    outer = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (purelib / "zz_reuse_outer_venv.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "--quiet", str(wheel)], check=True, capture_output=True, text=True)
    return venv


def _run(venv, args, cwd, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MMSEL_CACHE": str(cwd / "cache"),
                **env}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_from_wheel_outside_the_repo(wheel_venv, tmp_path):
    """hf-mmsel from the wheel, run from a temporary folder with no checkout on sys.path: command list, a cached
    --help, README's main job (shortened) with its summary, the refusal of a second run into the same folder,
    README's DISSect command with its preset found by name, and a MoLA adapter loaded by peft alone (the start-up
    hook; with the hook switched off peft's KeyError is checked in test_mola_load.py)."""
    import time

    cli = str(wheel_venv / "bin" / "hf-mmsel")
    top = _run(wheel_venv, [cli, "--help"], tmp_path)
    assert top.returncode == 0 and all(c in top.stdout for c in ("train-clip", "train-mola", "curate",
                                                                     "benchmark-selection", "benchmark-mola"))
    first = _run(wheel_venv, [cli, "train-mola", "--help"], tmp_path)
    start = time.perf_counter()
    second = _run(wheel_venv, [cli, "train-mola", "--help"], tmp_path)
    cached_s = time.perf_counter() - start
    assert first.returncode == second.returncode == 0 and "--model_name_or_path" in first.stdout
    assert second.stdout == first.stdout and cached_s < 2.0, cached_s

    out = tmp_path / "run"
    flags = ["train-mola", "--output_dir", str(out), "--max_steps", "2", "--max_per_task", "40", "--hidden_size",
             "16", "--num_hidden_layers", "1", "--intermediate_size", "32", "--num_attention_heads", "2"]
    run = _run(wheel_venv, [cli, *flags], tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "***** train-mola: MoLA-Grad finished *****" in run.stdout and "eval_mean_acc" in run.stdout
    assert str(out / "README.md") in run.stdout and "PeftModel.from_pretrained" in run.stdout
    assert "'loss': '" not in run.stdout + run.stderr  # numbers are logged as numbers
    again = _run(wheel_venv, [cli, *flags], tmp_path)
    assert again.returncode == 1 and "--overwrite_output_dir" in again.stderr and "Traceback" not in again.stderr
    listed = _run(wheel_venv, [cli, "configs"], tmp_path)  # README commands outside a checkout: configs by name
    assert listed.returncode == 0 and "clip_dissect" in listed.stdout and "mola_default" in listed.stdout
    # README's DISSect command (hf-mmsel train-clip --preset clip_dissect --noise_ratio 0.4), shortened: the config is
    # found by name in the installed package, from a folder outside the checkout and with no checkout on sys.path
    clip = _run(wheel_venv, [cli, "train-clip", "--preset", "clip_dissect", "--noise_ratio", "0.4", "--max_train",
                             "256", "--num_train_epochs", "2", "--selection_warmup_passes", "1", "--save_strategy",
                             "no", "--output_dir", str(tmp_path / "clip")], tmp_path)
    assert clip.returncode == 0, clip.stdout[-2000:] + clip.stderr[-3000:]
    assert "***** train-clip: dissect finished *****" in clip.stdout
    where = _run(wheel_venv, [str(wheel_venv / "bin" / "python"), "-c", "import sys, hf_mmsel.cli as c; "
                              "print(c.CONFIGS_DIR); print(*sys.path, sep='\\n')"], tmp_path)
    configs_dir, *path = where.stdout.split("\n")
    assert configs_dir.startswith(str(wheel_venv)) and (Path(configs_dir) / "clip_dissect.yaml").is_file()
    # the checkout's sources are on no path (a site-packages folder of a venv inside the checkout may be)
    assert not any(p and (Path(p) / "hf_mmsel" / "__init__.py").resolve().is_relative_to(ROOT / "hf_mmsel")
                   for p in path), path
    bad = _run(wheel_venv, [cli, "train-clip", "--config", "clip_dissect", "--dataset", "./mine"], tmp_path)
    assert bad.returncode == 2 and "--dataset './mine': no such" in bad.stderr and "Traceback" not in bad.stderr

    code = ("import sys\n"
            "from peft import PeftConfig, PeftModel\n"
            f"t = PeftConfig.from_pretrained({str(out)!r}).peft_type; print(getattr(t, 'value', t))\n"  # peft alone
            "from hf_mmsel.models.multitask import load_multitask_vit\n"
            f"m = PeftModel.from_pretrained(load_multitask_vit({str(out / 'base_model')!r}), {str(out)!r})\n"
            "import hf_mmsel; print(type(m.base_model).__name__, hf_mmsel.__file__)\n")
    load = _run(wheel_venv, [str(wheel_venv / "bin" / "python"), "-c", code], tmp_path)
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.split()[0] == "MOLA" and load.stdout.split()[1] == "MolaModel"
    assert str(wheel_venv) in load.stdout.split()[2]  # the wheel's copy, not the checkout
