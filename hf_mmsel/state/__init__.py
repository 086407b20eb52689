"""Sharded per-sample state of contrastive training (plain torch; no Trainer import).

``SampleOwnership`` (which rank owns which ``sample_idx``), ``PerSampleState`` (the one container of every hook's
per-sample arrays), ``OwnerStableBatchSampler`` (map-style candidates from owned samples only), ``PassSchedule``
(schedules in passes over the pool) and the per-rank checkpoint format (``checkpoint.py``).
"""

from .checkpoint import (HOOK_STATE_DIR, IncompleteCheckpointError, check_checkpoint_complete, load_sharded_state,
                         read_global_arrays, read_hook_state, read_index, save_sharded_state)
from .lagged import LaggedRecords, SelectionLagError, StepRecord
from .ownership import NotOwnedError, SampleOwnership
from .per_sample import PerSampleState, StateNamespace, all_gather_uneven, gather_global
from .sampler import OwnerStableBatchSampler, check_unique_sample_idx
from .schedule import PassSchedule, streaming_batches_per_pass

__all__ = ["HOOK_STATE_DIR", "IncompleteCheckpointError", "LaggedRecords", "SelectionLagError", "StepRecord", "NotOwnedError", "OwnerStableBatchSampler", "PassSchedule",
           "PerSampleState", "SampleOwnership", "StateNamespace", "all_gather_uneven", "check_checkpoint_complete",
           "gather_global", "load_sharded_state", "read_global_arrays", "read_hook_state", "read_index", "save_sharded_state",
           "streaming_batches_per_pass", "check_unique_sample_idx"]
