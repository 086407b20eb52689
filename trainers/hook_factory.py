"""The hook chain of :class:`~hf_mmsel.trainers.ContrastiveTrainer` built from its arguments.

A hook's keyword arguments are read from the argument fields of the same name with the hook's prefix
(:func:`kwargs_from_fields`: ``GSCHook(beta=)`` from ``gsc_beta``, ``StructureConfig(temperature=)`` from
``gsc_structure_temperature``, ``SelectionHook(score_source=)`` from ``selection_score_source``, a strategy's
``ema_beta`` from ``ema_beta``), so a new hook or strategy option needs a field, not a line here. Only values that
are computed (the warm-up in passes, the resolved lag, the seeds' defaults, the reference model) are passed by hand.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch

from hf_mmsel.gsc.hook import GSCHook, GSCPlusHook
from hf_mmsel.gsc.structure import StructureConfig
from hf_mmsel.models import CoTrainedDualEncoder, unwrap_model
from hf_mmsel.selection import SELECTION_STRATEGIES, SelectionHook, load_reference_model
from hf_mmsel.state import PassSchedule

from .reference_scoring import build_reference_model

__all__ = ["check_hooks_for_model", "gsc_hook_from_args", "kwargs_from_fields", "reference_from_args",
           "runner_settings", "selection_hook_from_args"]


def _parameters(fn: Callable) -> list[str]:
    return [name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def kwargs_from_fields(fns: Iterable[Callable], args: Any, prefixes: Iterable[str], **given: Any) -> dict[str, Any]:
    """Keyword arguments of the callables ``fns``: parameter ``p`` from the first field ``{prefix}{p}`` of ``args``
    that exists (prefixes in order; ``""`` for the bare name); ``given`` wins and parameters without a field are
    left to their defaults."""
    out: dict[str, Any] = {}
    for fn in fns:
        for name in _parameters(fn):
            for prefix in prefixes:
                if name not in out and hasattr(args, prefix + name):
                    out[name] = getattr(args, prefix + name)
    return {**out, **given}


def reference_from_args(args: Any, reference_scores: torch.Tensor | None, reference_model,
                        score_reference: Callable[[Any], torch.Tensor], dtype: torch.dtype | None):
    """``(reference_scores, reference_model, reference)``: the fixed scores of ``reference_clipscore`` (computed
    once with ``score_reference`` from ``reference_model`` or ``selection_reference_model``) and the frozen
    reference of the learnability strategies (None when the strategy needs none)."""
    if args.selection_strategy == "reference_clipscore" and reference_scores is None:
        if reference_model is None and args.selection_reference_model:
            reference_model = load_reference_model(args.selection_reference_model)
        if reference_model is None:
            raise ValueError(
                "selection_strategy 'reference_clipscore' needs reference scores: pass reference_scores=, "
                "reference_model= or --reference_scores_path"
            )
        reference_scores = score_reference(reference_model)
    reference = None
    if SELECTION_STRATEGIES[args.selection_strategy].needs_reference:  # learnability: a frozen forward per batch
        reference = build_reference_model(
            reference_model, args.selection_reference_model, strategy=args.selection_strategy,
            loss_type=args.loss_type, logit_scale_max=args.logit_scale_max, device=args.device, dtype=dtype)
    return reference_scores, reference_model, reference


def selection_hook_from_args(args: Any, schedule: PassSchedule, *, reference_scores=None,
                             reference=None) -> SelectionHook:
    """The :class:`SelectionHook` of ``args`` (``selection_*`` fields, and the strategies' own option fields)."""
    warmup = args.warmup_passes_for(schedule.total_passes)
    if args.selection_strategy == "dissect":
        schedule.check_warmup(warmup)
    strategies = [cls.__init__ for cls in SELECTION_STRATEGIES.values()]
    kwargs = kwargs_from_fields(
        [SelectionHook.__init__, *strategies], args, ("selection_", ""),
        seed=args.seed if args.selection_seed is None else args.selection_seed, warmup_epochs=warmup,
        lag=args.resolved_selection_lag, reference_scores=reference_scores, reference=reference)
    return SelectionHook(**kwargs)


def gsc_hook_from_args(args: Any, num_networks: int | None = None) -> GSCHook:
    """The :class:`GSCHook` of ``args`` (``gsc_*`` and ``gsc_structure_*`` fields); GSC+ (:class:`GSCPlusHook`)
    over ``num_networks`` co-trained networks with ``gsc_co_training``."""
    structure = StructureConfig(**kwargs_from_fields([StructureConfig], args, ("gsc_structure_",)))
    kwargs = kwargs_from_fields([GSCHook.__init__], args, ("gsc_",), structure=structure,
                                seed=args.seed if args.gsc_seed is None else args.gsc_seed,
                                diagnostics=args.selection_diagnostics)
    if args.gsc_co_training:
        return GSCPlusHook(num_networks=num_networks, **kwargs)
    return GSCHook(**kwargs)


def runner_settings(args: Any) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match."""
    return {"selection_strategy": args.selection_strategy, "gsc": bool(args.gsc),
            "gsc_co_training": bool(args.gsc_co_training),
            "selection_diagnostics": bool(args.selection_diagnostics),
            "selection_score_source": args.selection_score_source,
            "selection_exploration": float(args.selection_exploration),
            "selection_lag": args.resolved_selection_lag if args.selection_score_source != "fresh" else 1}


def check_hooks_for_model(args: Any, model, extra_hooks: Iterable[Any]) -> None:
    """Named errors for GSC settings that do not fit the model or the extra hooks."""
    co_trained = isinstance(unwrap_model(model), CoTrainedDualEncoder)
    if args.gsc and any(isinstance(h, (GSCHook, GSCPlusHook)) for h in extra_hooks):
        raise ValueError("args.gsc=True builds a GSCHook already; do not also pass one in hooks=")
    if args.gsc_co_training and not co_trained:
        raise ValueError(
            f"gsc_co_training=True (GSC+) needs a CoTrainedDualEncoder model (two networks trained together); "
            f"got {type(unwrap_model(model)).__name__}. Wrap two dual encoders: CoTrainedDualEncoder([a, b])"
        )
    if args.gsc and co_trained and not args.gsc_co_training:
        raise ValueError(
            "gsc=True with a CoTrainedDualEncoder needs gsc_co_training=True (GSC+: each network weighted by "
            "its peer's w); single-network GSC takes a plain dual encoder"
        )
