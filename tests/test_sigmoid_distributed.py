"""2-process CPU run (gloo): SigLIP's sigmoid loss and its gradients equal one process on the concatenated batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import accelerate_launch, run_checked
from sigmoid_dist_worker import one_process_reference, trainer_run

WORKER = Path(__file__).with_name("sigmoid_dist_worker.py")


@pytest.mark.slow
def test_two_process_sigmoid_loss_and_gradients_equal_one_process(tmp_path):
    run_checked(accelerate_launch(2) + [str(WORKER), str(tmp_path)])

    two = json.loads((tmp_path / "loss_level.json").read_text())
    one = one_process_reference()
    assert two["per_image"] == pytest.approx(one["per_image"], rel=1e-6, abs=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert set(two["grads"]) == set(one["grads"]) == {"image.weight", "image.bias", "text.weight", "text.bias",
                                                      "logit_scale", "logit_bias"}
    for name, grad in one["grads"].items():
        assert any(abs(g) > 1e-4 for g in grad), name  # every gradient is non-trivial, so the check has teeth
        assert two["grads"][name] == pytest.approx(grad, rel=1e-5, abs=1e-7), name

    trained = json.loads((tmp_path / "trainer.json").read_text())
    single = trainer_run(tmp_path / "single")  # same global batch of 16 pairs in one process
    reference = [h["loss"] for h in single.state.log_history if "loss" in h]
    assert len(trained["losses"]) == len(reference) == 8
    assert trained["losses"] == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert trained["logit_bias"] == pytest.approx(float(single.model.logit_bias.detach()), rel=1e-5)
    assert trained["logit_bias"] != pytest.approx(-10.0, abs=1e-4)  # the trainer-registered bias was trained
