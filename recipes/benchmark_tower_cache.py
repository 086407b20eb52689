"""Thin wrapper so `python recipes/benchmark_tower_cache.py ...` keeps working; the recipe is
`hf_mmsel.recipes.benchmark_tower_cache`."""

from hf_mmsel.recipes.benchmark_tower_cache import main

if __name__ == "__main__":
    main()
