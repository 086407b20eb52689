"""Thin wrapper so `python recipes/benchmark_curation.py ...` keeps working; the recipe is `hf_mmsel.recipes.benchmark_curation`."""

from hf_mmsel.recipes.benchmark_curation import main

if __name__ == "__main__":
    main()
