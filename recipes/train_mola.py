"""Thin wrapper so `accelerate launch recipes/train_mola.py ...` keeps working; the recipe is `hf_mmsel.recipes.train_mola`."""

import sys

from hf_mmsel.recipes.train_mola import main  # noqa: F401  (importable as before)

if __name__ == "__main__":  # through the hf-mmsel dispatcher: early checks, one-line errors
    from hf_mmsel.cli import main as cli_main

    sys.exit(cli_main(["train-mola", *sys.argv[1:]]))
