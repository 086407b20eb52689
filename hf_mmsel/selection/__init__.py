"""Online sample selection for contrastive training (DISSect and baselines); plain torch, no Trainer import."""

from __future__ import annotations

from .bank import ScoreBank
from .hook import SCORE_SOURCES, SelectionHook, clip_score, keep_with_exploration, num_to_keep, selection_generator
from .hardest_clean import RECOMMENDED, HardestClean, hardest_clean_criterion
from .joint import joint_select
from .learnability import ReferenceModel, load_reference_model
from .reference import load_reference_scores
from .sampler import SelectingBatchSampler
from .strategies import SELECTION_STRATEGIES, Candidates, SelectionStrategy, build_strategy, top_k

__all__ = [
    "joint_select",
    "HardestClean",
    "RECOMMENDED",
    "hardest_clean_criterion",
    "load_reference_model",
    "load_reference_scores",
    "ReferenceModel",
    "SCORE_SOURCES",
    "SelectingBatchSampler",
    "keep_with_exploration",
    "SELECTION_STRATEGIES",
    "Candidates",
    "ScoreBank",
    "SelectionHook",
    "SelectionStrategy",
    "build_strategy",
    "clip_score",
    "num_to_keep",
    "selection_generator",
    "top_k",
]
