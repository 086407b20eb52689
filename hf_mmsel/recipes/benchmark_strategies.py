"""Strategy names of ``benchmark-selection``: ``<selection>[+joint][+gsc][:option=value...]``."""

from __future__ import annotations

from typing import Any

GSC_SUFFIX = "+gsc"
JOINT_SUFFIX = "+joint"  # JEST joint selection (--joint_chunks chunks) of a learnability-family strategy


def is_joint(name: str) -> bool:
    """Whether benchmark strategy ``name`` (e.g. ``learnability+joint``) uses JEST joint selection."""
    name = name.split(":")[0]
    return (name[: -len(GSC_SUFFIX)] if name.endswith(GSC_SUFFIX) else name).endswith(JOINT_SUFFIX)


#: Per-run options of a benchmark strategy name (``dissect:r=0.3:score_source=last_visit``): alias -> flag.
RUN_OPTIONS: dict[str, str] = {
    "r": "select_rate", "select_rate": "select_rate",
    "score_source": "selection_score_source", "selection_score_source": "selection_score_source",
    "exploration": "selection_exploration", "selection_exploration": "selection_exploration",
    "in_sampler": "selection_in_sampler", "selection_in_sampler": "selection_in_sampler",
}


def run_options(name: str) -> tuple[str, dict[str, Any]]:
    """Split ``dissect+gsc:r=0.3:score_source=last_visit`` into the strategy (``dissect+gsc``) and its flag
    overrides (``{"select_rate": 0.3, "selection_score_source": "last_visit"}``), so that one benchmark process can
    compare rates and score sources of the same strategy alternately, under the same machine load."""
    base, *parts = name.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in RUN_OPTIONS:
            raise ValueError(f"{name!r}: bad run option {part!r}; use key=value with key in {sorted(RUN_OPTIONS)}")
        flag = RUN_OPTIONS[key]
        if flag == "selection_in_sampler":
            if value.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"{name!r}: in_sampler must be true/false, got {value!r}")
            options[flag] = value.lower() in ("1", "true")
        elif flag == "selection_score_source":
            options[flag] = value
        else:
            options[flag] = float(value)
    return base, options


def parse_strategy(name: str) -> tuple[str, bool]:
    """``(selection strategy, with GSC weighting)`` of a benchmark strategy name: ``gsc`` -> ``("full", True)``,
    ``dissect+gsc`` -> ``("dissect", True)``, ``random`` -> ``("random", False)``, ``learnability+joint`` ->
    ``("learnability", False)`` (joint: :func:`is_joint`); run options (:func:`run_options`) are ignored."""
    from hf_mmsel.selection import SELECTION_STRATEGIES
    from hf_mmsel.selection.learnability import JOINT_STRATEGIES

    name = run_options(name)[0]
    if name == "gsc":
        return "full", True
    selection, gsc = (name[: -len(GSC_SUFFIX)], True) if name.endswith(GSC_SUFFIX) else (name, False)
    if selection.endswith(JOINT_SUFFIX):
        selection = selection[: -len(JOINT_SUFFIX)]
        if selection not in JOINT_STRATEGIES:
            raise ValueError(f"{name!r}: {JOINT_SUFFIX} needs one of {list(JOINT_STRATEGIES)}")
    if selection not in SELECTION_STRATEGIES:
        choices = sorted(SELECTION_STRATEGIES) + ["gsc"] + [f"{s}{GSC_SUFFIX}" for s in sorted(SELECTION_STRATEGIES)
                                                            if s != "full"]
        raise ValueError(f"unknown strategy {name!r}; choose from {choices}")
    return selection, gsc
