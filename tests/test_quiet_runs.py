"""Quiet runs: a real ``hf-mmsel`` command prints no known harmless library notice and no warning twice;
``HF_MMSEL_VERBOSE=1`` / ``--debug`` keep every message (hf_mmsel.quiet)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from _helpers import ROOT

#: what a run must not print: DeepSpeed's accelerator probe, transformers' torchvision fallback, deprecation notes
OFFENDERS = ("Setting accelerator to CPU", "requires torchvision", "FutureWarning", "is deprecated")


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    for name in ("HF_MMSEL_VERBOSE", "PYTHONWARNINGS"):  # what a user sees by default
        env.pop(name, None)
    return {**env, **extra}


def _message_lines(text: str) -> list[str]:
    """The lines of ``text`` that are messages (progress bars, redrawn with carriage returns, are not)."""
    lines = []
    for line in text.replace("\r", "\n").splitlines():
        line = line.strip()
        if line and not ("%|" in line and "/s]" in line or line.endswith("?it/s]")):
            lines.append(line)
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["train-clip", "--selection_strategy", "full", "--max_steps", "2", "--max_train", "64"],
    ["train-mola", "--max_steps", "2", "--max_per_task", "40"],
], ids=["train-clip", "train-mola"])
def test_a_short_run_prints_no_library_noise(command, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_mmsel", *command, "--output_dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for offender in OFFENDERS:
        assert offender not in proc.stdout + proc.stderr, (offender, proc.stderr[-3000:])
    repeated = {line: n for line, n in Counter(_message_lines(proc.stderr)).items() if n > 1}
    assert not repeated, repeated


_PROBE = """
import logging, warnings
from hf_mmsel.quiet import quiet_third_party
on = quiet_third_party()
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were "
                                       "unable to detect it.")
logging.getLogger("DeepSpeed").warning("ZeRO stage 3 needs more memory")
logging.getLogger("transformers.utils.import_utils").warning(
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ...")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("`some_flag` is deprecated, use `other_flag`", FutureWarning)
print("filters on" if on else "filters off")
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "HF_MMSEL_VERBOSE=1"])
def test_only_the_known_notices_are_dropped(verbose):
    env = _env(**({"HF_MMSEL_VERBOSE": "1"} if verbose else {}))
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("filters off" if verbose else "filters on")
    assert "ZeRO stage 3 needs more memory" in proc.stderr  # anything else still shows
    assert "`some_flag` is deprecated" in proc.stderr
    for known in ("Setting accelerator to CPU", "requires torchvision", "`is_gradient_checkpointing`"):
        assert (known in proc.stderr) is verbose, (known, proc.stderr)


def test_debug_keeps_every_notice():
    from hf_mmsel.quiet import verbose_requested

    assert verbose_requested(["--max_steps", "2", "--debug"])
    assert verbose_requested([]) is (os.environ.get("HF_MMSEL_VERBOSE", "").lower() in ("1", "true", "yes", "on"))
