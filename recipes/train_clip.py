"""Thin wrapper so `accelerate launch recipes/train_clip.py ...` keeps working; the recipe is `hf_mmsel.recipes.train_clip`."""

from hf_mmsel.recipes.train_clip import main

if __name__ == "__main__":
    main()
