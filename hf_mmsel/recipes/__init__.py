"""The runnable recipes, shipped in the wheel: ``hf-mmsel <command>``, ``python -m hf_mmsel.recipes.<name>``,
``accelerate launch -m hf_mmsel.recipes.<name>``, or the thin wrappers in a checkout's ``recipes/`` folder.

Recipes compose the algorithm cores and the trainers; they hold no algorithm code. Their YAML defaults live in
``hf_mmsel/recipes/configs/`` (package data).
"""
