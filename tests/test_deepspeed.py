"""DeepSpeed ZeRO-2 on 2 CPU processes: a resumed run keeps its score bank (DeepSpeed skips
``Trainer._load_from_checkpoint``; the hook state is restored in ``on_train_begin``), and CLIP's 0-dim
``logit_scale`` trains (reshaped to ``[1]``, saved 0-dim). The first launch JIT-builds a DeepSpeed comm op (~90 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import accelerate_launch, run_checked

pytest.importorskip("deepspeed", reason="install the test extra: pip install --no-build-isolation deepspeed")
WORKER = Path(__file__).with_name("deepspeed_worker.py")


@pytest.mark.slow
def test_deepspeed_zero2_resume_keeps_the_score_bank(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_checked(accelerate_launch(2) + [str(WORKER), str(tmp_path)], timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ds_env"] == "cpu"
    # checkpoint-4 is the end of the snapshot pass (4 steps per pass): all 64 pairs scored, restored as such
    assert summary["step_at_begin"] == 4 and summary["seen_at_begin"] == 64
    assert summary["final_seen"] == 64 and summary["bank_max_abs_diff"] < 1e-3
    assert summary["logit_scale_shape"] == [1] and summary["saved_logit_scale_shape"] == []
