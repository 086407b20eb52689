"""Thin wrapper so `accelerate launch recipes/train_clip.py ...` keeps working; the recipe is `hf_mmsel.recipes.train_clip`."""

import sys

from hf_mmsel.recipes.train_clip import main  # noqa: F401  (importable as before)

if __name__ == "__main__":  # through the hf-mmsel dispatcher: early checks, one-line errors
    from hf_mmsel.cli import main as cli_main

    sys.exit(cli_main(["train-clip", *sys.argv[1:]]))
