"""Thin wrapper so `accelerate launch recipes/benchmark_mola_step.py ...` keeps working; the recipe is `hf_mmsel.recipes.benchmark_mola_step`."""

from hf_mmsel.recipes.benchmark_mola_step import main

if __name__ == "__main__":
    main()
