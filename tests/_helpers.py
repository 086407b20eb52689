"""Helpers shared by the test modules: loading a recipe script as a module, multi-process launch commands."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def load_recipe(name: str):
    """The recipe module ``hf_mmsel.recipes.<name>`` (``recipes/<name>.py`` is a thin wrapper around it)."""
    return importlib.import_module(f"hf_mmsel.recipes.{name}")


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` with ``num_processes`` CPU processes, every option explicit (no config file needed).

    Two or more processes need ``--multi_gpu`` plus ``use_cpu`` in the script: ``--cpu`` would silently run
    ONE process (docs/design.md, Stack §5), so scripts launched with this assert their world size.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + (["--multi_gpu", "--main_process_port", "0"] if num_processes > 1 else ["--cpu"])


def run_checked(cmd: list[str], timeout: int = 300):
    """Run ``cmd`` from the repository root with one thread per process and the repo + ``tests/`` importable;
    fail the test with the tail of its output when it exits non-zero."""
    import os
    import subprocess

    python_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


#: the vocabulary of the tiny BERT text towers of the tower tests
TOWER_WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "dog", "on", "the", "mat"]


def save_tiny_bert(folder: Path, words=TOWER_WORDS) -> Path:
    """A tiny BERT text tower (2 layers, width 24) with a word-level tokenizer over ``words``, saved to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words))}
    BertTokenizer(vocab=vocab, model_max_length=24).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def save_tiny_resnet(folder: Path) -> Path:
    """A tiny ResNet image tower (BatchNorm running statistics, a [B, C, 1, 1] pooled output) with its own 16 px
    processor (mean 0.5, std 0.25), saved to ``folder``."""
    import torch
    from transformers import CLIPImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                       image_std=[0.25] * 3).save_pretrained(folder)
    return folder
