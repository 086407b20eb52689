"""The training data of :class:`~hf_mmsel.trainers.ContrastiveTrainer`: dataset checks and the owner-stable
batch samplers typed for ``Trainer``.

A map-style dataset is read through the owner-stable batch sampler (rank r draws only ``sample_idx mod W = r``;
:class:`~hf_mmsel.state.OwnerStableBatchSampler`), with ``selection_in_sampler`` the selecting one
(:class:`~hf_mmsel.selection.SelectingBatchSampler`); a stream is a rank-configured
:class:`~hf_mmsel.data.streaming.StreamingImageTextDataset` (rank r reads and owns its shards).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import BatchRebalanceSampler

from hf_mmsel.selection import SelectingBatchSampler, num_to_keep
from hf_mmsel.state import OwnerStableBatchSampler, PassSchedule, check_unique_sample_idx

__all__ = ["OwnerStableTrainerSampler", "SelectingTrainerSampler", "check_dataset", "check_train_inputs",
           "is_streaming", "num_samples", "pass_schedule", "sample_indices", "stream_loader", "train_sampler"]


def is_streaming(dataset) -> bool:
    from hf_mmsel.data.streaming import StreamingImageTextDataset

    return isinstance(dataset, StreamingImageTextDataset)


class OwnerStableTrainerSampler(OwnerStableBatchSampler, BatchRebalanceSampler):
    """The owner-stable batch sampler, typed as a ``BatchRebalanceSampler`` so that Trainer passes it as
    ``batch_sampler`` and neutralises accelerate's re-sharding (it is already rank-aware)."""

    def __init__(self, *args, **kwargs) -> None:
        OwnerStableBatchSampler.__init__(self, *args, **kwargs)


class SelectingTrainerSampler(SelectingBatchSampler, BatchRebalanceSampler):
    """``selection_in_sampler``: the selecting owner-stable sampler, typed for Trainer like the one above."""

    def __init__(self, *args, **kwargs) -> None:
        SelectingBatchSampler.__init__(self, *args, **kwargs)


def check_dataset(dataset, name: str):
    """``dataset`` with a ``sample_idx`` column (added when missing); a named error without image and text."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # streaming or custom dataset: checked by the collator
        return dataset
    has_image = "pixel_values" in columns or "image" in columns
    has_text = "input_ids" in columns or "caption" in columns
    if not (has_image and has_text):
        raise ValueError(
            f"{name} needs an 'image' (or cached 'pixel_values') and a 'caption' (or cached 'input_ids') column; "
            f"it has {columns}"
        )
    if "sample_idx" not in columns:
        from hf_mmsel.data import add_sample_idx

        fmt = getattr(dataset, "format", None) or {}
        dataset = add_sample_idx(dataset)
        if fmt.get("type"):
            dataset = dataset.with_format(fmt["type"], columns=None, output_all_columns=True)
    return dataset


def check_train_inputs(args, datasets: dict) -> None:
    """Check (and give a ``sample_idx`` column to) ``datasets["train_dataset"/"eval_dataset"]`` in place; named
    errors for what a stream does not support."""
    for name in ("train_dataset", "eval_dataset"):
        if datasets.get(name) is not None:
            datasets[name] = check_dataset(datasets[name], name)
    if is_streaming(datasets.get("train_dataset")) and args.selection_in_sampler:
        raise ValueError("selection_in_sampler=True needs a map-style train_dataset (streams are not supported yet)")
    if is_streaming(datasets.get("train_dataset")) and args.max_steps <= 0:
        raise ValueError("a streaming train_dataset needs max_steps > 0 (the stream is infinite)")


def sample_indices(dataset) -> torch.Tensor:
    """``sample_idx`` of every row of a map-style dataset (its position when it has no such column)."""
    if "sample_idx" in (getattr(dataset, "column_names", None) or []) and hasattr(dataset, "select_columns"):
        import numpy as np

        column = dataset.select_columns(["sample_idx"]).with_format("numpy")["sample_idx"]
        return torch.from_numpy(np.array(column, dtype=np.int64))
    return torch.arange(len(dataset))


def num_samples(dataset) -> int:
    """``N``: one more than the largest ``sample_idx`` (a stream's manifest count)."""
    if is_streaming(dataset):
        return int(dataset.num_samples)
    idx = sample_indices(dataset)
    return int(idx.max()) + 1 if idx.numel() else len(dataset)


def train_sampler(dataset, args, batch_size: int, dist):
    """The owner-stable batch sampler of a map-style dataset: rank r's candidates are the rows whose
    ``sample_idx mod W = r`` (with ``selection_in_sampler`` it yields the k = round(r*B) kept rows of each candidate
    batch), after checking that no ``sample_idx`` repeats (:func:`~hf_mmsel.state.check_unique_sample_idx`)."""
    sample_idx = sample_indices(dataset)
    check_unique_sample_idx(sample_idx, name="train_dataset")
    kwargs = dict(world_size=dist.world_size, rank=dist.rank, seed=args.seed,
                  shuffle=args.train_sampling_strategy != "sequential")
    if args.selection_in_sampler:
        kwargs["kept_size"] = num_to_keep(batch_size, args.select_rate)
    cls = SelectingTrainerSampler if args.selection_in_sampler else OwnerStableTrainerSampler
    return cls(sample_idx, batch_size, **kwargs)


def stream_loader(dataset, args) -> DataLoader:
    """The rank-configured stream in a ``DataLoader(batch_size=None)`` that accelerate does not re-shard."""
    kwargs = dict(batch_size=None, num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)
    if args.dataloader_num_workers > 0:
        kwargs.update(prefetch_factor=args.dataloader_prefetch_factor,
                      persistent_workers=args.dataloader_persistent_workers, in_order=True)
    return DataLoader(dataset, **kwargs)


def pass_schedule(args, batches_per_pass: int) -> PassSchedule:
    """Candidate batches per pass and in all (``max_steps`` or ``num_train_epochs`` passes)."""
    if args.max_steps > 0:
        total = args.max_steps * args.gradient_accumulation_steps
    else:
        total = int(math.ceil(float(args.num_train_epochs) * batches_per_pass))
    return PassSchedule(batches_per_pass, max(1, total))
