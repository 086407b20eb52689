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

# A local fake Hub (tests/fake_hub.py, stdlib only) for the whole session. HF libraries read HF_ENDPOINT at
# import, so it is set here; with HF_HUB_OFFLINE=1 nothing contacts it (or anything) unless a test takes the
# `fake_hub` fixture. It also keeps an accidental online call on 127.0.0.1.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_hub import FakeHub  # noqa: E402

_FAKE_HUB = FakeHub.start()
os.environ["HF_ENDPOINT"] = _FAKE_HUB.endpoint
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tmp_out(tmp_path):
    """A fresh output directory for recipes and trainers."""
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture
def fake_hub(monkeypatch):
    """The session's fake Hub, online for this test only; yields a ``FakeHub`` (``.endpoint``, ``.token``,
    ``.list_repo_files(repo_id, repo_type)``, ``.read_file(...)``, ``.requests``).

    Protocol-level test of our push/load code against huggingface_hub's HTTP flow, not Hub validation.
    Repos are reset per test; offline flags and HF_TOKEN are restored afterwards; any DNS lookup or
    connection to a non-loopback address raises ``fake_hub.NonLoopbackConnectionError``.
    """
    yield _FAKE_HUB.activate(monkeypatch)
