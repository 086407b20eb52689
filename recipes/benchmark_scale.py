"""Thin wrapper so `python recipes/benchmark_scale.py ...` keeps working; the recipe is `hf_mmsel.recipes.benchmark_scale`."""

from hf_mmsel.recipes.benchmark_scale import main

if __name__ == "__main__":
    main()
