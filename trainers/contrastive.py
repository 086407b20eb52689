"""``ContrastiveTrainer``: symmetric InfoNCE (or SigLIP's sigmoid loss) for any dual encoder, with online sample
selection and per-sample weighting at the data boundary. Trainer overrides only:

* the hook chain (:class:`~hf_mmsel.state.HookRunner`) is built from the arguments by ``hook_factory.py``; each
  candidate batch goes through it (selection keeps ``k = round(r*B)`` pairs, GSC weights them, extra hooks add
  weights / losses), and its sharded per-sample state is saved before ``Trainer._save_checkpoint`` and restored in
  ``on_train_begin`` (every backend calls it after loading the model);
* the training and scoring forwards are :class:`~hf_mmsel.selection.scoring_forward.PairForward`'s; the data
  order (owner-stable samplers, streams) is ``contrastive_data.py``'s, GSC+ ``co_training.py``'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer

from hf_mmsel.losses import PairLoss, get_pair_loss
from hf_mmsel.hooks import BatchHook, LossTerms, PairEmbeddings, subset_batch
from hf_mmsel.models.locking import (TOWER_ADAPTER_DIR, configure_tower_training, has_tower_lora,
                                     load_tower_adapter_state, merged_state_dict, save_tower_adapter)
from hf_mmsel.models.tower_cache import cache_scope, cached_call
from hf_mmsel.models import (CoTrainedDualEncoder, check_dual_encoder, logit_scale_of, make_logit_scale_1d,
                             unwrap_model)
from hf_mmsel.selection import SelectionHook, load_reference_scores
from hf_mmsel.selection.scoring_forward import PairForward
from hf_mmsel.state import (HOOK_STATE_DIR, OwnerStableBatchSampler, PassSchedule, SampleOwnership,
                            check_checkpoint_complete, streaming_batches_per_pass)
from hf_mmsel.state.runner import HookRunner, require_process_group

from .co_training import co_training_loss
from .contrastive_config import SCORE_PLOT_NAME, ContrastiveTrainingArguments
from .contrastive_data import (check_dataset, check_train_inputs, is_streaming, num_samples, pass_schedule,
                               stream_loader, train_sampler)
from .hook_callback import HookCallback
from .hook_factory import (check_hooks_for_model, gsc_hook_from_args, reference_from_args, runner_settings,
                           selection_hook_from_args)
from .log_window import LogWindow
from .logging_defaults import no_pin_memory_without_accelerator, use_numeric_progress
from .reference_scoring import compute_reference_scores

__all__ = ["ContrastiveTrainer", "ContrastiveTrainingArguments", "HOOK_STATE_DIR", "SCORE_PLOT_NAME"]

logger = logging.getLogger(__name__)


class ContrastiveTrainer(Trainer):
    """Trains any dual encoder (``get_image_features``/``get_text_features``) with a learned logit scale, selecting
    pairs online with ``args.selection_strategy``; with ``args.gsc`` a GSC hook weights the kept pairs
    (:meth:`gsc_weights`: its per-sample ``w``).

    Args (besides ``Trainer``'s): ``hooks``: extra :class:`BatchHook`s run after selection (and GSC);
    ``class_captions``: prompts for zero-shot accuracy in :meth:`evaluate`; ``reference_scores`` /
    ``reference_model``: the fixed reference of ``reference_clipscore`` (a ``[N]`` tensor, or a model scored once)
    and the frozen reference of the learnability strategies (else ``args.selection_reference_model``). Batches need
    ``pixel_values``, ``input_ids``, ``attention_mask``, ``sample_idx`` (a ground-truth ``is_noisy`` is only logged).
    ``train_dataset``: map-style or a :class:`~hf_mmsel.data.streaming.StreamingImageTextDataset` (``max_steps``
    required). The tower settings (``lock_*_tower``, ``tower_lora_*``, ...) are applied to the model here
    (``tower_training`` reports them); ``tower_cache`` is the embedding cache of wholly locked towers
    (:mod:`hf_mmsel.models.tower_cache`, set up at train begin, None when off).
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
        check_train_inputs(args, kwargs)
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
        check_hooks_for_model(args, model, self._extra_hooks)
        self.scoring = PairForward.from_args(args, fsdp=self.is_fsdp_enabled)  # the training / scoring forwards
        self.runner: HookRunner | None = None
        self.tower_cache = None  # TowerEmbeddingCache of the wholly locked towers, set up at train begin
        self.resume_checkpoint: str | None = None  # the checkpoint train() resumes, restored at train begin
        self._train_sampler: OwnerStableBatchSampler | None = None
        self._log_window = LogWindow()  # step logs averaged over the logging window and the ranks
        self.pass_end_logs: dict[str, float] = {}  # pass-end updates' logs, written with the next log
        self.add_callback(HookCallback(self))

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def streaming(self) -> bool:
        return is_streaming(self.train_dataset)

    @property
    def num_samples(self) -> int:
        """``N``: the size of the ``sample_idx`` space of the training set."""
        return num_samples(self.train_dataset)

    def _ownership(self) -> SampleOwnership:
        dist = require_process_group(self.args.world_size)
        if self.streaming:
            ranges = self._configured_stream().owned_ranges()
            return SampleOwnership(self.num_samples, dist.world_size, dist.rank, rule="ranges", ranges=ranges)
        return SampleOwnership(self.num_samples, dist.world_size, dist.rank)

    def _get_train_sampler(self, train_dataset=None):
        """The owner-stable batch sampler (:func:`~hf_mmsel.trainers.contrastive_data.train_sampler`), built once."""
        if self._train_sampler is None:
            dist = require_process_group(self.args.world_size)
            self._train_sampler = train_sampler(self.train_dataset, self.args, self._train_batch_size, dist)
        return self._train_sampler

    def _configured_stream(self):
        if self.train_dataset.rank is None:
            dist = require_process_group(self.args.world_size)
            self.train_dataset = self.train_dataset.for_rank(
                rank=dist.rank, world_size=dist.world_size, batch_size=self._train_batch_size,
                collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers, seed=self.args.seed)
        return self.train_dataset

    def get_train_dataloader(self):
        """Map-style: Trainer's loader with the owner-stable batch sampler. Streaming: the rank-configured stream
        in a ``DataLoader(batch_size=None)`` that accelerate does not re-shard or dispatch."""
        if not self.streaming:
            return super().get_train_dataloader()
        return stream_loader(self._configured_stream(), self.args)

    def _schedule(self) -> PassSchedule:
        if self.streaming:
            per_pass = streaming_batches_per_pass(self.num_samples, self.args.world_size or 1,
                                                  self._train_batch_size)
        else:
            per_pass = len(self._get_train_sampler())
        return pass_schedule(self.args, per_pass)

    def build_hooks(self) -> HookRunner:
        """Create the hook chain from the arguments and allocate every hook's (sharded) per-sample state."""
        if self.runner is not None:
            return self.runner
        args, schedule = self.args, self._schedule()
        self._reference_scores, self._reference_model, reference = reference_from_args(
            args, self._reference_scores, self._reference_model, self.compute_reference_scores, self.scoring.dtype)
        self.selection_hook = selection_hook_from_args(args, schedule, reference_scores=self._reference_scores,
                                                       reference=reference)
        if args.selection_in_sampler:  # the sampler built for the schedule selects from this hook's state
            self._get_train_sampler().select = self.selection_hook.select_candidates
        if args.gsc:  # GSC+ over the co-trained networks with gsc_co_training
            networks = unwrap_model(self.model).num_networks if self.co_trained else None
            self.gsc_hook = gsc_hook_from_args(args, networks)
        gsc = [self.gsc_hook] if self.gsc_hook is not None else []
        runner = HookRunner([self.selection_hook, *gsc, *self._extra_hooks], runner_settings(args))
        runner.setup(self.num_samples, self._ownership(), args.device, schedule,
                     dist=require_process_group(args.world_size))
        self.runner = runner
        return runner

    _build_hooks = build_hooks  # its earlier name

    @property
    def dist(self):
        """The collectives of this run (:class:`~hf_mmsel.hooks.Dist`)."""
        return self.build_hooks().dist

    @property
    def hook(self):
        """The hook chain (:class:`~hf_mmsel.hooks.HookList`: selection, GSC, extra hooks)."""
        return self.build_hooks().hooks

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
        runner = self.build_hooks()
        return runner.gather_local(self.gsc_hook.weights(network).detach().float(), fill=1.0).cpu().clone()

    def compute_reference_scores(self, reference_model, dataset=None) -> torch.Tensor:
        """CLIPScores ``100*max(cos, 0)`` of a fixed ``reference_model`` for every ``sample_idx`` of the training
        set (one no-grad pass), for ``reference_clipscore``."""
        return compute_reference_scores(reference_model, self.train_dataset if dataset is None else dataset,
                                        self.data_collator, num_samples=self.num_samples,
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
        self.resume_checkpoint = str(resume_from_checkpoint) if resume_from_checkpoint else None
        if self.streaming:
            self.args.ignore_data_skip = True  # the stream seeks to its position (stateless resume)
            self.args.accelerator_config.dispatch_batches = False
        self.runner = None
        runner = self.build_hooks()
        if resume_from_checkpoint:  # settings mismatch: a named error before Trainer loads weights / optimizer
            from hf_mmsel.state import read_index

            runner.check_compatible(read_index(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # ---------------------------------------------------------------------------------------- the step
    def _uses_wrapper_forward(self, model) -> bool:
        """DDP (gradient all-reduce), FSDP (parameter all-gather) and DeepSpeed need their wrapper's ``forward``."""
        return self.scoring.uses_wrapper_forward(model)

    def _score_batch(self, model, inputs) -> PairEmbeddings:
        """The no-grad scoring forward of the current model on the full candidate batch; cheap with
        ``score_image_size`` / ``score_patch_drop`` (then, on the last step of each logging window, also the exact
        forward, logging the Spearman rank agreement of the positive-pair cosines as ``score_spearman``)."""
        every = max(1, int(getattr(self.state, "logging_steps", 0) or self.args.logging_steps or 1))
        emb, rho = self.scoring.score(model, inputs, step=self.runner.step if self.runner is not None else 0,
                                      compare_exact=(self.state.global_step + 1) % every == 0)
        if rho is not None:
            self._accumulate_logs({"score_spearman": torch.tensor(rho)})
        return emb

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
        runner = self.build_hooks()
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
            image, text = self.scoring.embed(model, inputs)
        scale = logit_scale_of(model, max_scale=self.args.logit_scale_max)
        per_sample = self.contrastive_loss_per_sample(image, text, scale, ctx.loss)
        terms = loss_terms(image, text, scale, inputs["sample_idx"], per_sample, ctx) if training else LossTerms()
        loss = self._weighted_mean(per_sample, terms)
        if training:
            self._accumulate_logs({**ctx.logs, **terms.logs, "logit_scale": scale.detach(), **ctx.loss.logs()})
        if return_outputs:
            return loss, {"image_embeds": image, "text_embeds": text, "per_sample_loss": per_sample}
        return loss

    # ---------------------------------------------------------------------------------------- logging
    def _accumulate_logs(self, logs: dict[str, torch.Tensor]) -> None:
        self._log_window.add(logs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_window:
            dist = self.runner.dist if self.runner is not None else None
            logs = {**logs, **self._log_window.means(self.args.device, dist)}
        if self.pass_end_logs:
            logs, self.pass_end_logs = {**logs, **self.pass_end_logs}, {}
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
        runner = self.build_hooks()
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
        self.build_hooks().save(folder, self.state.global_step, meta)
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
            dataset = check_dataset(dataset, "eval_dataset")
        metrics = evaluate_retrieval(
            self.model, dataset, self.data_collator, self.class_captions,
            batch_size=self.args.per_device_eval_batch_size, tokenizer=self.processing_class,
            prefix=f"{metric_key_prefix}_", device=self.args.device,
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
