"""Thin wrapper so `accelerate launch recipes/benchmark_mola.py ...` keeps working; the recipe is `hf_mmsel.recipes.benchmark_mola`."""

from hf_mmsel.recipes.benchmark_mola import main

if __name__ == "__main__":
    main()
