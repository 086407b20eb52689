"""Test-wide settings: offline, one thread, a throw-away HF_HOME.

These environment variables must be set before anything imports huggingface_hub, transformers or datasets,
which read them at import time; conftest.py is imported by pytest before any test module.
"""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="hf_mmsel_test_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tmp_out(tmp_path):
    """A fresh output directory for recipes and trainers."""
    out = tmp_path / "out"
    out.mkdir()
    return out
