"""2-process CPU run (gloo): sharded score banks (i mod 2) and a per-step loss equal to the 1-process loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import accelerate_launch, run_checked
from contrastive_dist_worker import run

WORKER = Path(__file__).with_name("contrastive_dist_worker.py")


@pytest.mark.slow
def test_two_process_banks_identical_and_loss_matches_one_process(tmp_path):
    run_checked(accelerate_launch(2) + [str(WORKER), str(tmp_path)])

    banks = [load_file(str(tmp_path / f"bank_rank{r}.safetensors")) for r in range(2)]
    assert banks[0]["owned"].tolist() == list(range(0, 64, 2)) and banks[1]["owned"].tolist() == list(range(1, 64, 2))
    for key in ("bank.hist", "bank.seen"):  # the shards gathered from both owners give one bank on both ranks
        torch.testing.assert_close(banks[1][key], banks[0][key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert bool(banks[0]["bank.seen"].all())  # the global bank saw all pairs, each scored by its owner

    two_process = json.loads((tmp_path / "losses.json").read_text())
    one_process = run(tmp_path / "single", "full", 16, 2, "sequential")  # same global batch of 16 pairs
    reference = [h["loss"] for h in one_process.state.log_history if "loss" in h]
    assert len(two_process) == len(reference) == 8
    assert two_process == pytest.approx(reference, rel=1e-4, abs=1e-5)
