"""``HookCallback``: what :class:`~hf_mmsel.trainers.ContrastiveTrainer`'s hook runner does around Trainer's loop.

* train begin (every backend calls it after wrapping and loading the model, before the first batch): restore the
  hook state of the checkpoint being resumed (re-sharded when the world size changed), seek a stream to its
  position, set up the tower embedding cache;
* step end (after each optimizer step): clamp ``logit_scale``, run the pass-end update of every completed pass
  (with ``selection_diagnostics`` also GSC's ``w`` against the ground truth), kept for the next log;
* train end: flush the tower cache, write the score plot.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from hf_mmsel.gsc.hook import weight_diagnostics
from hf_mmsel.models import CoTrainedDualEncoder, unwrap_model
from hf_mmsel.models.tower_cache import backend_problem, build_tower_cache

__all__ = ["HookCallback", "clamp_logit_scale"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def clamp_logit_scale(model, logit_scale_max: float) -> None:
    """Keep every network's raw ``logit_scale`` in ``[0, log(logit_scale_max)]``."""
    inner = unwrap_model(model)
    for module in (inner.networks if isinstance(inner, CoTrainedDualEncoder) else [inner]):
        raw = getattr(module, "logit_scale", None)
        if isinstance(raw, torch.Tensor) and raw.numel():
            raw.clamp_(0.0, math.log(logit_scale_max))


class HookCallback(TrainerCallback):
    """See the module docstring; ``trainer`` is the :class:`ContrastiveTrainer` it serves."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        runner = trainer.build_hooks()
        if trainer.resume_checkpoint is not None:
            index = runner.load(trainer.resume_checkpoint, state.global_step)
            if trainer.streaming and index.get("stream") != trainer.train_dataset.resume_signature():
                logger.warning(
                    "resuming a stream with other settings than the checkpoint's (%s now, %s then): the state is "
                    "re-sharded and the run continues, but the data order differs from an uninterrupted run",
                    trainer.train_dataset.resume_signature(), index.get("stream"))
        if trainer.streaming:
            trainer.train_dataset.set_consumed_batches(state.global_step * args.gradient_accumulation_steps)
        if trainer.tower_cache is not None:
            trainer.tower_cache.close()
        trainer.tower_cache = build_tower_cache(  # outputs of wholly locked towers per sample_idx
            trainer.model, mode=args.tower_embedding_cache, output_dir=args.output_dir,
            num_samples=trainer.num_samples, dataset=trainer.train_dataset, collator=trainer.data_collator,
            device=args.device, is_main=args.should_save, unsupported=backend_problem(args))
        if not trainer.streaming:
            logger.info(
                "dataloader_drop_last=True (equal k on every rank): %d of this rank's pairs are not candidates in "
                "each pass; the next pass's permutation covers them", trainer._get_train_sampler().dropped_per_pass)
        logger.info("per-sample hook state: %d bytes on this rank (%.2f B/sample owned)", runner.state_bytes_per_rank(),
                    runner.state_bytes_per_rank() / max(1, runner.ownership.num_local))

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        clamp_logit_scale(trainer.model, args.logit_scale_max)
        if trainer.runner is None:
            return
        logs = trainer.runner.end_completed_passes()
        if logs and trainer.gsc_hook is not None and args.selection_diagnostics:  # O(N) gathers: opt-in
            noisy = trainer.selection_hook.noisy if trainer.selection_hook is not None else None
            logs.update(weight_diagnostics(trainer.gsc_weights(), None if noisy is None
                                           else trainer.runner.gather_local(noisy, fill=-1).cpu()))
        trainer.pass_end_logs.update(logs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.tower_cache is not None:
            self.trainer.tower_cache.flush()
            logger.info("tower embedding cache: %s", self.trainer.tower_cache.describe())
        if args.plot_score_distributions and args.selection_diagnostics and self.trainer.is_world_process_zero():
            self.trainer.save_score_plot()
