"""Thin wrapper so `accelerate launch recipes/benchmark_selection.py ...` keeps working; the recipe is `hf_mmsel.recipes.benchmark_selection`."""

from hf_mmsel.recipes.benchmark_selection import main

if __name__ == "__main__":
    main()
