"""Time to the first error of each bad-input case of a new user's first hour (one subprocess per case).

    python recipes/time_first_error.py [--bound 2.0]

Each case runs ``python -m hf_mmsel ...`` from a temporary folder with one thread and ``HF_HUB_OFFLINE=1`` (unless
the case says it is unset: then the Hub is probed once, so run it without network to time the offline case), and must
fail with a one-line error and the expected exit code; ``--bound`` also asserts that every case with a warm flag cache
failed within that many seconds. The misspelled-flag case runs twice: cold (the flag list is not cached yet, the
recipe's parser pays the transformers import) and warm.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cases(work: Path) -> list[tuple[str, list[str], int]]:
    from PIL import Image

    data = work / "pairs"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(data / f"{i}.png")
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,red {i}\n" for i in range(4)))
    used = work / "used"
    used.mkdir()
    (used / "old.txt").write_text("a previous run")
    return [
        ("misspelled flag (cold cache)", ["train-clip", "--max_stepz", "3"], 2),
        ("misspelled flag", ["train-clip", "--max_stepz", "3"], 2),
        ("wrong --caption_column", ["train-clip", "--dataset", str(data), "--output_dir", str(work / "o1")], 2),
        ("--dataset ./no_such_dir", ["train-clip", "--dataset", "./no_such_dir"], 2),
        ("--dataset no_such_dir (HF_HUB_OFFLINE=1)", ["train-clip", "--dataset", "no_such_dir"], 2),
        ("--dataset no_such_dir (HF_HUB_OFFLINE unset)", ["train-clip", "--dataset", "no_such_dir"], 2),
        ("missing --model_name_or_path", ["train-clip", "--model_name_or_path", "./my_model"], 2),
        ("curate: used --output_dir", ["curate", "--model_name_or_path", str(data), "--output_dir", str(used)], 1),
        ("train-mola: used --output_dir", ["train-mola", "--output_dir", str(used)], 1),
        ("unknown --config name", ["train-clip", "--config", "clip_dissekt"], 2),
        ("unknown --preset name", ["train-clip", "--preset", "clip_dissekt"], 2),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bound", type=float, default=None, help="assert every warm case fails within this (s)")
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MMSEL_CACHE": str(work / "cache"),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        print(f"{'case':<46} {'seconds':>8}  exit  error")
        for name, argv_, expected in _cases(work):
            start = time.perf_counter()
            case_env = {k: v for k, v in env.items() if not ("OFFLINE unset" in name and k == "HF_HUB_OFFLINE")}
            proc = subprocess.run([sys.executable, "-m", "hf_mmsel", *argv_], cwd=work, env=case_env,
                                  capture_output=True, text=True, timeout=600)
            seconds = time.perf_counter() - start
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            print(f"{name:<46} {seconds:>8.2f}  {proc.returncode:>4}  {last[:110]}")
            if proc.returncode != expected or "Traceback" in proc.stderr:
                failures.append(f"{name}: exit {proc.returncode} (expected {expected})")
            elif args.bound is not None and "cold" not in name and seconds > args.bound:
                failures.append(f"{name}: {seconds:.2f} s > {args.bound} s")
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
