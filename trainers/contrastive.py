"""``ContrastiveTrainer``: symmetric InfoNCE for any dual encoder, with online sample selection at the data boundary.

Thin glue between ``transformers.Trainer`` and the cores. Each step the per-device candidate batch (B pairs with
``sample_idx``) goes through a :class:`~hf_mmsel.state.HookRunner`: the :class:`~hf_mmsel.selection.SelectionHook`
built from the arguments (DISSect by default) keeps ``k = round(r*B)`` pairs; with ``gsc=True`` a
:class:`~hf_mmsel.gsc.hook.GSCHook` then weights them; optional extra hooks add their own weights / losses. The
loss is chosen in one place (:meth:`ContrastiveTrainer.contrastive_loss_per_sample`) with negatives gathered
across ranks. GSC+ (``gsc_co_training=True``) lives in ``co_training.py``, reference scoring in
``reference_scoring.py``.

Per-sample state is sharded (``hf_mmsel.state``): a map-style dataset is read through the owner-stable batch
sampler (rank r draws only ``sample_idx mod W = r``), a stream through the rank-configured
:class:`~hf_mmsel.data.streaming.StreamingImageTextDataset` (rank r reads and owns its shards). The hook state is
written into every checkpoint before ``Trainer._save_checkpoint`` (one file per rank + ``index.json``) and
restored in ``on_train_begin``, which every backend (plain, DDP, FSDP, DeepSpeed) calls after loading the model.

Stale scores (``selection_score_source="last_visit"``) are recorded by the selection hook's ``loss_terms`` from the
training forward; with ``selection_in_sampler`` the owner-stable sampler is a
:class:`~hf_mmsel.selection.SelectingBatchSampler` that asks the hook (``select_candidates``) which pairs to load.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler

from hf_mmsel.losses import PairLoss, get_pair_loss
from hf_mmsel.hooks import BatchHook, LossTerms, PairEmbeddings, subset_batch
from hf_mmsel.models.locking import (TOWER_ADAPTER_DIR, configure_tower_training, has_tower_lora,
                                     load_tower_adapter_state, merged_state_dict, save_tower_adapter)
from hf_mmsel.models.tower_cache import backend_problem, build_tower_cache, cache_scope, cached_call
from hf_mmsel.models import (CoTrainedDualEncoder, check_dual_encoder, encode_pair, image_features, logit_scale_of,
                             make_logit_scale_1d, text_features, unwrap_model)
from hf_mmsel.selection import (SELECTION_STRATEGIES, SelectingBatchSampler, SelectionHook, load_reference_model,
                                load_reference_scores, num_to_keep)
from hf_mmsel.selection.cheap_scoring import patch_drop, resize_for_scoring, spearman, vision_embeddings
from hf_mmsel.state import (HOOK_STATE_DIR, OwnerStableBatchSampler, PassSchedule, SampleOwnership,
                            check_checkpoint_complete, check_unique_sample_idx, streaming_batches_per_pass)
from hf_mmsel.state.runner import HookRunner, require_process_group

from .co_training import co_training_loss
from .contrastive_config import SCORE_PLOT_NAME, ContrastiveTrainingArguments
from .logging_defaults import no_pin_memory_without_accelerator, use_numeric_progress
from .reference_scoring import build_reference_model, compute_reference_scores

__all__ = ["ContrastiveTrainer", "ContrastiveTrainingArguments", "HOOK_STATE_DIR", "SCORE_PLOT_NAME"]

logger = logging.getLogger(__name__)


def _is_streaming(dataset) -> bool:
    from hf_mmsel.data.streaming import StreamingImageTextDataset

    return isinstance(dataset, StreamingImageTextDataset)


class _OwnerStableTrainerSampler(OwnerStableBatchSampler, BatchRebalanceSampler):
    """The owner-stable batch sampler, typed as a ``BatchRebalanceSampler`` so that Trainer passes it as
    ``batch_sampler`` and neutralises accelerate's re-sharding (it is already rank-aware)."""

    def __init__(self, *args, **kwargs) -> None:
        OwnerStableBatchSampler.__init__(self, *args, **kwargs)


class _SelectingTrainerSampler(SelectingBatchSampler, BatchRebalanceSampler):
    """``selection_in_sampler``: the selecting owner-stable sampler, typed for Trainer like the one above."""

    def __init__(self, *args, **kwargs) -> None:
        SelectingBatchSampler.__init__(self, *args, **kwargs)


class _HookCallback(TrainerCallback):
    """Restores the hook state at train begin, runs pass-end updates after each optimizer step, keeps
    ``logit_scale`` clamped and writes the score plot."""

    def __init__(self, trainer: "ContrastiveTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._clamp_logit_scale()
        self.trainer._end_completed_passes()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.tower_cache is not None:
            self.trainer.tower_cache.flush()
            logger.info("tower embedding cache: %s", self.trainer.tower_cache.describe())
        if args.plot_score_distributions and args.selection_diagnostics and self.trainer.is_world_process_zero():
            self.trainer.save_score_plot()


class ContrastiveTrainer(Trainer):
    """Trains any dual encoder (``get_image_features``/``get_text_features``) with symmetric InfoNCE and a learned
    logit scale, selecting pairs online with ``args.selection_strategy``.

    With ``args.gsc`` a :class:`~hf_mmsel.gsc.hook.GSCHook` built from the ``gsc_*`` arguments runs right after
    selection (it weights the kept pairs); :meth:`gsc_weights` returns its current per-sample weights ``w``. Its
    pass-end GMM/EMA update gives every rank the single-process result. With ``selection_diagnostics`` and batches
    carrying ``is_noisy``, diagnostics are logged: mean ``w`` over clean and noisy pairs and the AUROC of ``w``.

    Args (besides ``Trainer``'s): ``hooks``: extra :class:`BatchHook`s run after selection (and GSC);
    ``class_captions``: prompts for zero-shot accuracy in :meth:`evaluate`; ``reference_scores`` /
    ``reference_model``: the fixed reference for ``reference_clipscore`` (a ``[N]`` tensor, or a model scored once
    over the training set); ``reference_model`` is also the frozen reference of ``learnability`` / ``easy_reference``
    (else ``args.selection_reference_model``), run no-grad on every candidate batch. Batches need ``pixel_values``, ``input_ids``, ``attention_mask``, ``sample_idx``; a
    ground-truth ``is_noisy`` is only logged (``selected_noisy_fraction``), never used for training.
    ``train_dataset`` may be a map-style dataset or a :class:`~hf_mmsel.data.streaming.StreamingImageTextDataset`
    (then ``max_steps`` is required). The tower settings (``lock_image_tower``, ``lock_text_tower``,
    ``*_unlocked_layers``, ``tower_lora_*``) are applied to the model here
    (:func:`hf_mmsel.models.locking.configure_tower_training`); ``tower_training`` reports what trains (None when
    none is set). With ``tower_embedding_cache`` (``auto`` by default) the outputs of every wholly locked tower are
    computed once per ``sample_idx``, kept under ``output_dir/tower_cache`` and reused by the scoring and the
    training forwards (:mod:`hf_mmsel.models.tower_cache`); ``tower_cache`` is its
    :class:`~hf_mmsel.models.tower_cache.TowerEmbeddingCache` (set up at train begin, None when off).
    """

    def __init__(
        self,
        model=None,
        args: ContrastiveTrainingArguments | None = None,
        *,
        hooks: Sequence[BatchHook] | None = None,
        class_captions: Sequence[str] | None = None,
        reference_scores: torch.Tensor | None = None,
        reference_model=None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = ContrastiveTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, ContrastiveTrainingArguments):
            raise TypeError(f"ContrastiveTrainer needs ContrastiveTrainingArguments, got {type(args).__name__}")
        if model is None:
            raise ValueError("ContrastiveTrainer needs a dual-encoder model")
        check_dual_encoder(model)
        for name in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(name)
            if dataset is not None:
                kwargs[name] = self._check_dataset(dataset, name)
        if _is_streaming(kwargs.get("train_dataset")) and args.selection_in_sampler:
            raise ValueError("selection_in_sampler=True needs a map-style train_dataset (streams are not supported yet)")
        if _is_streaming(kwargs.get("train_dataset")) and args.max_steps <= 0:
            raise ValueError("a streaming train_dataset needs max_steps > 0 (the stream is infinite)")
        get_pair_loss(args.loss_type).prepare_model(model, logit_scale_max=args.logit_scale_max)  # sigmoid: t', b
        # lock_*_tower / *_unlocked_layers / tower_lora_*: frozen (eval-mode) towers, LoRA adapters; None: untouched
        tower_training = configure_tower_training(model, args)
        if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            make_logit_scale_1d(model)  # DeepSpeed cannot broadcast 0-dim parameters (CLIP's logit_scale)
        super().__init__(model=model, args=args, **kwargs)
        no_pin_memory_without_accelerator(self.args)  # read when the DataLoaders are built
        use_numeric_progress(self)
        self.class_captions = list(class_captions) if class_captions is not None else None
        self.tower_training = tower_training
        if tower_training is not None:
            for line in tower_training.lines():
                logger.info(line)
            logger.info(tower_training.summary())
        self._reference_model = reference_model
        if reference_scores is None and args.reference_scores_path:
            reference_scores = load_reference_scores(args.reference_scores_path)
        self._reference_scores = reference_scores
        self.selection_hook: SelectionHook | None = None
        self.gsc_hook = None  # GSCHook when args.gsc, built with the other hooks at train start
        self._extra_hooks = list(hooks or [])
        if args.gsc:
            from hf_mmsel.gsc.hook import GSCHook, GSCPlusHook

            if any(isinstance(h, (GSCHook, GSCPlusHook)) for h in self._extra_hooks):
                raise ValueError("args.gsc=True builds a GSCHook already; do not also pass one in hooks=")
        co_trained = isinstance(unwrap_model(model), CoTrainedDualEncoder)
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
        self.runner: HookRunner | None = None
        self.tower_cache = None  # TowerEmbeddingCache of the wholly locked towers, set up at train begin
        self._resume_checkpoint: str | None = None
        self._train_sampler: OwnerStableBatchSampler | None = None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_counts: dict[str, int] = {}
        self._pending_logs: dict[str, float] = {}
        self.add_callback(_HookCallback(self))

    # ------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _check_dataset(dataset, name: str):
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

    @property
    def streaming(self) -> bool:
        return _is_streaming(self.train_dataset)

    def _sample_indices(self) -> torch.Tensor:
        """``sample_idx`` of every row of the map-style training set."""
        dataset = self.train_dataset
        if "sample_idx" in (getattr(dataset, "column_names", None) or []) and hasattr(dataset, "select_columns"):
            import numpy as np

            column = dataset.select_columns(["sample_idx"]).with_format("numpy")["sample_idx"]
            return torch.from_numpy(np.array(column, dtype=np.int64))
        return torch.arange(len(dataset))

    def _num_samples(self) -> int:
        if self.streaming:
            return int(self.train_dataset.num_samples)
        idx = self._sample_indices()
        return int(idx.max()) + 1 if idx.numel() else len(self.train_dataset)

    def _ownership(self) -> SampleOwnership:
        dist = require_process_group(self.args.world_size)
        n = self._num_samples()
        if self.streaming:
            ranges = self._configured_stream().owned_ranges()
            return SampleOwnership(n, dist.world_size, dist.rank, rule="ranges", ranges=ranges)
        return SampleOwnership(n, dist.world_size, dist.rank)

    def _get_train_sampler(self, train_dataset=None):
        """The owner-stable batch sampler: rank r's candidates are the rows whose ``sample_idx mod W = r``. Built
        once per run, after checking that no ``sample_idx`` repeats (:func:`~hf_mmsel.state.check_unique_sample_idx`)."""
        if self._train_sampler is None:
            sample_idx = self._sample_indices()
            check_unique_sample_idx(sample_idx, name="train_dataset")
            dist = require_process_group(self.args.world_size)
            kwargs = dict(world_size=dist.world_size, rank=dist.rank, seed=self.args.seed,
                          shuffle=self.args.train_sampling_strategy != "sequential")
            if self.args.selection_in_sampler:  # yields the k = round(r*B) kept rows of each candidate batch
                kwargs["kept_size"] = num_to_keep(self._train_batch_size, self.args.select_rate)
            cls = _SelectingTrainerSampler if self.args.selection_in_sampler else _OwnerStableTrainerSampler
            self._train_sampler = cls(sample_idx, self._train_batch_size, **kwargs)
        return self._train_sampler

    def _configured_stream(self):
        dataset = self.train_dataset
        if dataset.rank is None:
            dist = require_process_group(self.args.world_size)
            dataset = dataset.for_rank(rank=dist.rank, world_size=dist.world_size, batch_size=self._train_batch_size,
                                       collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                                       seed=self.args.seed)
            self.train_dataset = dataset
        return dataset

    def get_train_dataloader(self):
        """Map-style: Trainer's loader with the owner-stable batch sampler. Streaming: the rank-configured stream
        in a ``DataLoader(batch_size=None)`` that accelerate does not re-shard or dispatch."""
        if not self.streaming:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        dataset = self._configured_stream()
        kwargs = dict(batch_size=None, num_workers=self.args.dataloader_num_workers,
                      pin_memory=self.args.dataloader_pin_memory)
        if self.args.dataloader_num_workers > 0:
            kwargs.update(prefetch_factor=self.args.dataloader_prefetch_factor,
                          persistent_workers=self.args.dataloader_persistent_workers, in_order=True)
        return DataLoader(dataset, **kwargs)

    def _schedule(self) -> PassSchedule:
        ga = self.args.gradient_accumulation_steps
        if self.streaming:
            per_pass = streaming_batches_per_pass(self._num_samples(), self.args.world_size or 1,
                                                  self._train_batch_size)
        else:
            per_pass = len(self._get_train_sampler())
        if self.args.max_steps > 0:
            total = self.args.max_steps * ga
        else:
            total = int(math.ceil(float(self.args.num_train_epochs) * per_pass))
        return PassSchedule(per_pass, max(1, total))

    def _build_hooks(self) -> HookRunner:
        """Create the hook chain from the arguments and allocate every hook's (sharded) per-sample state."""
        if self.runner is not None:
            return self.runner
        args = self.args
        if args.selection_strategy == "reference_clipscore" and self._reference_scores is None:
            if self._reference_model is None and args.selection_reference_model:
                self._reference_model = load_reference_model(args.selection_reference_model)
            if self._reference_model is None:
                raise ValueError(
                    "selection_strategy 'reference_clipscore' needs reference scores: pass reference_scores=, "
                    "reference_model= or --reference_scores_path"
                )
            self._reference_scores = self.compute_reference_scores(self._reference_model)
        reference = None
        if SELECTION_STRATEGIES[args.selection_strategy].needs_reference:  # learnability: a frozen forward per batch
            reference = build_reference_model(
                self._reference_model, args.selection_reference_model, strategy=args.selection_strategy,
                loss_type=args.loss_type, logit_scale_max=args.logit_scale_max, device=args.device,
                dtype=self._score_dtype())
        schedule = self._schedule()
        warmup = args.warmup_passes_for(schedule.total_passes)
        if args.selection_strategy == "dissect":
            schedule.check_warmup(warmup)
        self.selection_hook = SelectionHook(
            args.selection_strategy, args.select_rate,
            seed=args.seed if args.selection_seed is None else args.selection_seed,
            diagnostics=args.selection_diagnostics, warmup_epochs=warmup, ema_beta=args.ema_beta,
            first_visit_fallback=args.first_visit_fallback, reference_scores=self._reference_scores,
            score_source=args.selection_score_source, exploration=args.selection_exploration,
            lag=args.resolved_selection_lag, in_sampler=args.selection_in_sampler,
            reference=reference, joint=args.selection_joint, joint_chunks=args.selection_joint_chunks,
            joint_temperature=args.selection_joint_temperature,
        )
        if args.selection_in_sampler:  # the sampler built for the schedule selects from this hook's state
            self._get_train_sampler().select = self.selection_hook.select_candidates
        if args.gsc:
            self.gsc_hook = self._build_gsc_hook()
        gsc = [self.gsc_hook] if self.gsc_hook is not None else []
        settings = {"selection_strategy": args.selection_strategy, "gsc": bool(args.gsc),
                    "gsc_co_training": bool(args.gsc_co_training),
                    "selection_diagnostics": bool(args.selection_diagnostics),
                    "selection_score_source": args.selection_score_source,
                    "selection_exploration": float(args.selection_exploration),
                    "selection_lag": args.resolved_selection_lag if args.selection_score_source != "fresh" else 1}
        runner = HookRunner([self.selection_hook, *gsc, *self._extra_hooks], settings)
        runner.setup(self._num_samples(), self._ownership(), args.device, schedule,
                     dist=require_process_group(args.world_size))
        self.runner = runner
        return runner

    def _build_gsc_hook(self):
        from hf_mmsel.gsc.hook import GSCHook
        from hf_mmsel.gsc.structure import StructureConfig

        a = self.args
        structure = StructureConfig(
            similarity=a.gsc_structure_similarity, temperature=a.gsc_structure_temperature,
            centered=a.gsc_structure_centered, matching=a.gsc_structure_matching,
            matching_temperature=a.gsc_structure_matching_temperature,
            max_batch_anchors=a.gsc_structure_max_batch_anchors,
        )
        kwargs = dict(
            gamma=a.gsc_gamma, structure=structure, beta=a.gsc_beta, ema_bias_correction=a.gsc_ema_bias_correction,
            prior_beta=a.gsc_prior_beta, weight_threshold=a.gsc_weight_threshold,
            bank_size=a.gsc_bank_size,
            bank_min_weight=a.gsc_bank_min_weight, gmm_max_iter=a.gsc_gmm_max_iter, gmm_tol=a.gsc_gmm_tol,
            gmm_reg_covar=a.gsc_gmm_reg_covar, max_fit_samples=a.gsc_max_fit_samples,
            prob_posterior=a.gsc_prob_posterior, prob_logit_scale=a.gsc_prob_logit_scale,
            seed=a.seed if a.gsc_seed is None else a.gsc_seed, diagnostics=a.selection_diagnostics,
        )
        if a.gsc_co_training:
            from hf_mmsel.gsc.hook import GSCPlusHook

            return GSCPlusHook(num_networks=unwrap_model(self.model).num_networks, **kwargs)
        return GSCHook(**kwargs)

    @property
    def dist(self):
        """The collectives of this run (:class:`~hf_mmsel.hooks.Dist`)."""
        return self._build_hooks().dist

    @property
    def hook(self):
        """The hook chain (:class:`~hf_mmsel.hooks.HookList`: selection, GSC, extra hooks)."""
        return self._build_hooks().hooks

    @property
    def co_trained(self) -> bool:
        """Whether the model is a :class:`CoTrainedDualEncoder` (per-network losses; GSC+ with ``gsc``)."""
        return isinstance(unwrap_model(self.model), CoTrainedDualEncoder)

    def gsc_weights(self, network: int | None = None) -> torch.Tensor:
        """GSC's current per-sample clean weights ``w`` (``[N]`` float32 on CPU, indexed by ``sample_idx``; all
        ones before the first pass end), gathered from the owning ranks (call on every rank). GSC+
        (``gsc_co_training``): network ``network``'s own ``w`` (the weights its *peer* trains with), or by default
        the mean over networks."""
        if not self.args.gsc:
            raise RuntimeError("gsc_weights() needs ContrastiveTrainingArguments(gsc=True)")
        runner = self._build_hooks()
        if self.args.gsc_co_training:
            local = self.gsc_hook.weights(network)
        elif network is not None:
            raise ValueError("gsc_weights(network=...) needs gsc_co_training=True (GSC+)")
        else:
            local = self.gsc_hook.buffers.weight
        return runner.gather_local(local.detach().float(), fill=1.0).cpu().clone()

    def compute_reference_scores(self, reference_model, dataset=None) -> torch.Tensor:
        """CLIPScores ``100*max(cos, 0)`` of a fixed ``reference_model`` for every ``sample_idx`` of the training
        set (one no-grad pass), for ``reference_clipscore``."""
        return compute_reference_scores(reference_model, self.train_dataset if dataset is None else dataset,
                                        self.data_collator, num_samples=self._num_samples(),
                                        batch_size=self.args.per_device_eval_batch_size, device=self.args.device)

    # ------------------------------------------------------------------------------------ train / resume
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            check_checkpoint_complete(resume_from_checkpoint)
        self._resume_checkpoint = str(resume_from_checkpoint) if resume_from_checkpoint else None
        if self.streaming:
            self.args.ignore_data_skip = True  # the stream seeks to its position (stateless resume)
            self.args.accelerator_config.dispatch_batches = False
        self.runner = None
        runner = self._build_hooks()
        if resume_from_checkpoint:  # settings mismatch: a named error before Trainer loads weights / optimizer
            from hf_mmsel.state import read_index

            runner.check_compatible(read_index(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _on_train_begin(self, state) -> None:
        """Every backend calls this after wrapping and loading the model, before the first batch is drawn."""
        runner = self._build_hooks()
        if self._resume_checkpoint is not None:
            index = runner.load(self._resume_checkpoint, state.global_step)
            if self.streaming and index.get("stream") != self.train_dataset.resume_signature():
                logger.warning(
                    "resuming a stream with other settings than the checkpoint's (%s now, %s then): the state is "
                    "re-sharded and the run continues, but the data order differs from an uninterrupted run",
                    self.train_dataset.resume_signature(), index.get("stream"))
        if self.streaming:
            self.train_dataset.set_consumed_batches(state.global_step * self.args.gradient_accumulation_steps)
        if self.tower_cache is not None:
            self.tower_cache.close()
        self.tower_cache = build_tower_cache(  # tower_embedding_cache: outputs of wholly locked towers per sample_idx
            self.model, mode=self.args.tower_embedding_cache, output_dir=self.args.output_dir,
            num_samples=self._num_samples(), dataset=self.train_dataset, collator=self.data_collator,
            device=self.args.device, is_main=self.args.should_save, unsupported=backend_problem(self.args))
        if not self.streaming:
            sampler = self._get_train_sampler()
            logger.info(
                "dataloader_drop_last=True (equal k on every rank): %d of this rank's pairs are not candidates in "
                "each pass; the next pass's permutation covers them", sampler.dropped_per_pass)
        logger.info("per-sample hook state: %d bytes on this rank (%.2f B/sample owned)", runner.state_bytes_per_rank(),
                    runner.state_bytes_per_rank() / max(1, runner.ownership.num_local))

    def _end_completed_passes(self) -> None:
        if self.runner is None:
            return
        logs = self.runner.end_completed_passes()
        if logs and self.gsc_hook is not None and self.args.selection_diagnostics:  # O(N) gathers: opt-in
            logs.update(self._gsc_diagnostics())
        self._pending_logs.update(logs)

    def _gsc_diagnostics(self) -> dict[str, float]:
        """Mean ``w`` over known-clean and known-noisy pairs and the AUROC of ``w`` (clean = positive) from the
        ground-truth ``is_noisy`` flags (``selection_diagnostics``); diagnostic only, never used for training."""
        weights = self.gsc_weights()
        logs = {"gsc_epoch_weight_mean": float(weights.mean())}
        if self.selection_hook is None or self.selection_hook.noisy is None:
            return logs
        noisy = self.runner.gather_local(self.selection_hook.noisy, fill=-1).cpu()
        clean, bad = noisy == 0, noisy == 1
        if bool(clean.any()) and bool(bad.any()):
            from hf_mmsel.metrics.detection import auroc

            known = clean | bad
            logs.update(gsc_weight_mean_clean=float(weights[clean].mean()),
                        gsc_weight_mean_noisy=float(weights[bad].mean()),
                        gsc_weight_auroc=auroc(weights[known].numpy(), clean[known].numpy()))
        return logs

    # ---------------------------------------------------------------------------------------- the step
    def _score_dtype(self) -> torch.dtype | None:
        choice = self.args.score_dtype
        if choice == "auto":
            return torch.bfloat16 if self.args.device.type == "cuda" else None
        return None if choice == "float32" else getattr(torch, choice)

    def _uses_wrapper_forward(self, model) -> bool:
        """DDP (gradient all-reduce), FSDP (parameter all-gather) and DeepSpeed need their wrapper's ``forward``."""
        return model is not unwrap_model(model) or self.args.world_size > 1 or self.is_fsdp_enabled

    def _embed(self, model, inputs, image_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings (with gradient unless called under ``no_grad``), through the wrapper's
        ``forward`` where the backend needs it (its output must carry ``image_embeds``/``text_embeds``, as
        CLIPModel's and VisionTextDualEncoderModel's do); ``get_*_features`` otherwise. ``image_kwargs`` (the
        scoring forward's ``interpolate_pos_encoding``) go to the image side."""
        image_kwargs = image_kwargs or {}
        if self._uses_wrapper_forward(model):
            out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                        attention_mask=inputs.get("attention_mask"), **image_kwargs)
            image, text = getattr(out, "image_embeds", None), getattr(out, "text_embeds", None)
            if image is None or text is None:
                raise TypeError(
                    f"{type(unwrap_model(model)).__name__}.forward must return image_embeds and text_embeds for "
                    "multi-process / sharded training (the backend needs the forward call)"
                )
            return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        if image_kwargs:
            check_dual_encoder(model)
            image = image_features(model, inputs["pixel_values"], **image_kwargs)
            text = text_features(model, inputs["input_ids"], inputs.get("attention_mask"))
            return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        return encode_pair(model, inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask"))

    def _score_batch(self, model, inputs) -> PairEmbeddings:
        """The no-grad scoring forward of the current model on the full candidate batch; cheap with
        ``score_image_size`` / ``score_patch_drop`` (then, on the last step of each logging window, also the exact
        forward, logging the Spearman rank agreement of the positive-pair cosines as ``score_spearman``)."""
        if not self.args.cheap_scoring:
            return self._score_forward(model, inputs)
        emb = self._cheap_score_forward(model, inputs)
        every = max(1, int(getattr(self.state, "logging_steps", 0) or self.args.logging_steps or 1))
        if (self.state.global_step + 1) % every == 0:  # the step that ends this logging window
            exact = self._score_forward(model, inputs)
            cheap_cos = (emb.image_embeds.float() * emb.text_embeds.float()).sum(-1)
            exact_cos = (exact.image_embeds.float() * exact.text_embeds.float()).sum(-1)
            rho = spearman(cheap_cos, exact_cos)
            if math.isfinite(rho):
                self._accumulate_logs({"score_spearman": torch.tensor(rho)})
        return emb

    def _score_image_kwargs(self, model, pixel_values: torch.Tensor) -> dict:
        """``interpolate_pos_encoding=True`` where the image size differs from the model's and the forward takes
        it; a named error for a ViT tower that cannot take another size; nothing for other (convolutional) towers."""
        inner = unwrap_model(model)
        vision_config = getattr(getattr(inner, "config", None), "vision_config", None)
        native = getattr(vision_config, "image_size", None)
        if native is not None and int(native) == int(pixel_values.shape[-1]) == int(pixel_values.shape[-2]):
            return {}
        fn = inner.forward if self._uses_wrapper_forward(model) else getattr(inner, "get_image_features", None)
        try:
            accepts = fn is not None and "interpolate_pos_encoding" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            accepts = False
        if accepts:
            return {"interpolate_pos_encoding": True}
        if vision_embeddings(inner):
            raise ValueError(
                f"score_image_size={self.args.score_image_size}: {type(inner).__name__} has a ViT vision tower "
                "with fixed position embeddings and its forward takes no interpolate_pos_encoding; unset "
                "score_image_size (or use score_patch_drop)")
        return {}

    def _cheap_score_forward(self, model, inputs) -> PairEmbeddings:
        args = self.args
        if args.score_image_size is not None:
            inputs = {**inputs, "pixel_values": resize_for_scoring(inputs["pixel_values"], args.score_image_size)}
        image_kwargs = self._score_image_kwargs(model, inputs["pixel_values"])
        drop = contextlib.nullcontext()
        if float(args.score_patch_drop) > 0.0:
            step = self.runner.step if self.runner is not None else 0
            seed = args.seed if args.selection_seed is None else args.selection_seed
            generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + step) * 997 + args.process_index)
            drop = patch_drop(model, args.score_patch_drop, generator)
        with drop:
            return self._score_forward(model, inputs, image_kwargs)

    def _score_forward(self, model, inputs, image_kwargs: dict | None = None) -> PairEmbeddings:
        dtype = self._score_dtype()
        autocast = (torch.autocast(device_type=self.args.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            if self.co_trained:  # ensemble embeddings (mean cosine); scale: the networks' mean
                if image_kwargs:
                    raise ValueError("score_image_size with interpolate_pos_encoding is not supported for a "
                                     "CoTrainedDualEncoder (GSC+) yet; unset score_image_size")
                image, text = encode_pair(model, inputs["pixel_values"], inputs["input_ids"],
                                          inputs.get("attention_mask"))
                scale = torch.stack([logit_scale_of(net, max_scale=self.args.logit_scale_max).reshape(())
                                     for net in unwrap_model(model).networks]).mean()
            else:
                image, text = self._embed(model, inputs, image_kwargs)
                scale = logit_scale_of(model, max_scale=self.args.logit_scale_max)
        return PairEmbeddings(image, text, scale.detach())

    def contrastive_loss_per_sample(self, image_embeds, text_embeds, logit_scale, pair_loss: PairLoss) -> torch.Tensor:
        """THE per-pair contrastive loss of a step (local rows, negatives gathered across ranks): softmax InfoNCE
        or SigLIP's sigmoid loss (``args.loss_type``; ``pair_loss`` carries the model's bias ``b``)."""
        dist = self.runner.dist if self.runner is not None else None
        return pair_loss.per_sample(image_embeds, text_embeds, logit_scale,
                                    gather_fn=dist.gather_with_grad if dist else None, rank=dist.rank if dist else 0)

    @staticmethod
    def _weighted_mean(per_sample: torch.Tensor, terms: LossTerms) -> torch.Tensor:
        loss = (per_sample * terms.weights).mean() if terms.weights is not None else per_sample.mean()
        return loss + terms.extra_loss if terms.extra_loss is not None else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "sample_idx" not in inputs:
            raise KeyError(f"ContrastiveTrainer batches need 'sample_idx'; got {sorted(inputs)}")
        runner = self._build_hooks()
        inputs = dict(inputs)
        size = int(inputs["sample_idx"].shape[0])
        training = model.training
        cache = self.tower_cache if training else None  # eval batches have their own sample_idx: never cached
        score_kinds = ("text",) if self.args.cheap_scoring else ("image", "text")  # cheap: other image inputs
        ctx = runner.context(lambda: cached_call(cache, inputs["sample_idx"], lambda: self._score_batch(model, inputs),
                                                 score_kinds), loss=get_pair_loss(self.args.loss_type).for_model(model))
        if training:
            keep = runner.prepare(inputs, ctx)
            if keep is not None:
                inputs = subset_batch(inputs, keep, size)
        loss_terms = runner.loss_terms if training else None
        if self.co_trained:
            with cache_scope(cache, inputs["sample_idx"]):
                loss, logs, per_network = co_training_loss(
                    model, inputs, ctx, per_sample_loss=self.contrastive_loss_per_sample, loss_terms=loss_terms,
                    weighted_mean=self._weighted_mean, logit_scale_max=self.args.logit_scale_max,
                    loss_type=self.args.loss_type)
            if training:
                self._accumulate_logs({**ctx.logs, **logs})
            return (loss, {"networks": per_network}) if return_outputs else loss
        with cache_scope(cache, inputs["sample_idx"]):
            image, text = self._embed(model, inputs)
        scale = logit_scale_of(model, max_scale=self.args.logit_scale_max)
        per_sample = self.contrastive_loss_per_sample(image, text, scale, ctx.loss)
        terms = loss_terms(image, text, scale, inputs["sample_idx"], per_sample, ctx) if training else LossTerms()
        loss = self._weighted_mean(per_sample, terms)
        if training:
            self._accumulate_logs({**ctx.logs, **terms.logs, "logit_scale": scale.detach(), **ctx.loss.logs()})
        if return_outputs:
            return loss, {"image_embeds": image, "text_embeds": text, "per_sample_loss": per_sample}
        return loss

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        inner = unwrap_model(self.model)
        for module in (inner.networks if isinstance(inner, CoTrainedDualEncoder) else [inner]):
            raw = getattr(module, "logit_scale", None)
            if isinstance(raw, torch.Tensor) and raw.numel():
                raw.clamp_(0.0, math.log(self.args.logit_scale_max))

    # ---------------------------------------------------------------------------------------- logging
    def _accumulate_logs(self, logs: dict[str, torch.Tensor]) -> None:
        for name, value in logs.items():
            value = torch.as_tensor(value).detach().float().reshape(())
            self._log_sums[name] = self._log_sums.get(name, 0.0) + value
            self._log_counts[name] = self._log_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_sums:
            names = sorted(self._log_sums)
            means = torch.stack([self._log_sums[n].to(self.args.device) / self._log_counts[n] for n in names])
            dist = self.runner.dist if self.runner is not None else None
            if dist is not None and dist.world_size > 1:
                means = dist.gather(means[None]).mean(0)  # same names on every rank; one collective
            logs = {**logs, **{n: round(float(v), 6) for n, v in zip(names, means.tolist())}}
            self._log_sums, self._log_counts = {}, {}
        if self._pending_logs:
            logs, self._pending_logs = {**logs, **self._pending_logs}, {}
        super().log(logs, start_time)

    def save_score_plot(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the clean vs noisy score distributions per pass (None if nothing was scored; needs
        ``selection_diagnostics``)."""
        hook = self.selection_hook
        if hook is None or not hook.epoch_histograms:
            return None
        from hf_mmsel.selection.plot import plot_score_distributions

        path = Path(path) if path is not None else Path(self.args.output_dir) / SCORE_PLOT_NAME
        return plot_score_distributions(hook.epoch_histograms, hook.histogram_epochs, path)

    # ------------------------------------------------------------------------------------ checkpoints
    def hook_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's hook state (its shard of the per-sample arrays + replicated state) plus the counters."""
        runner = self._build_hooks()
        state = {k: v.detach().cpu().contiguous() for k, v in runner.hooks.state_dict().items()}
        state["trainer.hook_step"] = torch.tensor(runner.step, dtype=torch.long)
        state["trainer.passes_ended"] = torch.tensor(runner.passes_ended, dtype=torch.long)
        return state

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save``; for a :class:`CoTrainedDualEncoder` (a plain module: Trainer writes its flat state
        dict) also the networks' configs, so the folder loads with ``CoTrainedDualEncoder.from_pretrained``. With
        tower LoRA (``tower_lora_r``) the folder gets the merged model and the peft adapter in ``adapter/``
        (:mod:`hf_mmsel.models.locking`)."""
        inner = unwrap_model(self.model)
        lora = has_tower_lora(inner)
        if lora:
            state_dict = merged_state_dict(inner, state_dict)
        super()._save(output_dir, state_dict)
        if lora and self.args.should_save:
            save_tower_adapter(inner, Path(output_dir if output_dir is not None else self.args.output_dir)
                               / TOWER_ADAPTER_DIR)
        if isinstance(inner, CoTrainedDualEncoder) and self.args.should_save:
            if all(hasattr(getattr(net, "config", None), "save_pretrained") for net in inner.networks):
                inner.save_configs(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """With tower LoRA the checkpoint's ``adapter/`` holds everything that trains (its main weights are merged):
        it is loaded into the model, whose frozen base is the same; otherwise ``Trainer``'s loading."""
        inner = unwrap_model(model if model is not None else self.model)
        adapter = Path(resume_from_checkpoint) / TOWER_ADAPTER_DIR
        if has_tower_lora(inner) and adapter.is_dir():
            load_tower_adapter_state(inner, adapter)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """Hook state first (every rank its shard, then rank 0 ``index.json``), then Trainer's checkpoint (which
        writes ``trainer_state.json`` last): a folder with both files is complete."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        meta = {"gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                "per_device_train_batch_size": self._train_batch_size}
        if self.streaming:
            meta["stream"] = self.train_dataset.resume_signature()
        if self.tower_cache is not None:
            self.tower_cache.flush()  # the filled flags of the rows written so far
        self._build_hooks().save(folder, self.state.global_step, meta)
        super()._save_checkpoint(model, trial)

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Pair-level retrieval R@1/5/10 both ways and ``rsum`` (percent; the hit is the pair's own caption / image),
        the class-level ``class_*`` scores when the data carry labels, plus ``zero_shot_acc`` with ``class_captions``."""
        from hf_mmsel.metrics import evaluate_retrieval

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate needs an eval_dataset")
        if eval_dataset is not None:
            dataset = self._check_dataset(dataset, "eval_dataset")
        metrics = evaluate_retrieval(
            self.model, dataset, self.data_collator, self.class_captions,
            batch_size=self.args.per_device_eval_batch_size, tokenizer=self.processing_class,
            prefix=f"{metric_key_prefix}_", device=self.args.device,
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
