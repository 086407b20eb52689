"""Thin wrapper so `accelerate launch recipes/train_mola.py ...` keeps working; the recipe is `hf_mmsel.recipes.train_mola`."""

from hf_mmsel.recipes.train_mola import main

if __name__ == "__main__":
    main()
