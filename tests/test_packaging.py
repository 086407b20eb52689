"""The wheel maps trainers/ -> hf_mmsel.trainers and model_cards/ -> hf_mmsel.model_cards (package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
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
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
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
    assert top_level <= {"hf_mmsel"} | {n.split("/")[0] for n in names if ".dist-info/" in n}, top_level
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
