"""Thin wrapper so `accelerate launch recipes/curate.py ...` keeps working; the recipe is `hf_mmsel.recipes.curate`."""

from hf_mmsel.recipes.curate import main

if __name__ == "__main__":
    main()
