"""``ContrastiveTrainer``: symmetric InfoNCE for any dual encoder, with online sample selection at the data boundary.

Each step the per-device candidate batch (B pairs with ``sample_idx``) goes through a :class:`~hf_mmsel.hooks.
BatchHook` chain: the :class:`~hf_mmsel.selection.SelectionHook` built from the arguments (DISSect by default)
keeps ``k = round(r*B)`` pairs; with ``gsc=True`` a :class:`~hf_mmsel.gsc.hook.GSCHook` then weights the kept pairs
(per-sample clean weights ``w`` + γ·structure loss, GMM/EMA update at every epoch end); optional extra hooks add
their own weights / losses. The loss is the per-pair InfoNCE of ``hf_mmsel.losses`` with negatives gathered across
ranks. GSC+ (``gsc_co_training=True``, gsc.md §6): the model is a :class:`~hf_mmsel.models.CoTrainedDualEncoder`;
every network gets its own per-pair InfoNCE on the same kept pairs, weighted by its peer's ``w``
(:class:`~hf_mmsel.gsc.hook.GSCPlusHook`), and the step loss is the sum over networks. Hook state (score bank, GSC
buffers) is replicated on every rank, written to ``selection_state.safetensors`` in every checkpoint and restored
on resume.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from hf_mmsel.contrastive_loss import pair_loss_for, prepare_model_for_loss
from hf_mmsel.hooks import BatchHook, Dist, HookList, PairEmbeddings, StepContext, subset_batch
from hf_mmsel.models import CoTrainedDualEncoder, check_dual_encoder, encode_pair, logit_scale_of, unwrap_model
from hf_mmsel.selection import SelectionHook, load_reference_scores

from .contrastive_config import SCORE_PLOT_NAME, ContrastiveTrainingArguments

__all__ = ["ContrastiveTrainer", "ContrastiveTrainingArguments", "HOOK_STATE_NAME", "SCORE_PLOT_NAME"]

HOOK_STATE_NAME = "selection_state.safetensors"
_STEP_KEY = "trainer.hook_step"
_EPOCHS_KEY = "trainer.epochs_ended"


class _HookCallback(TrainerCallback):
    """Runs the hooks' epoch-end update, keeps ``logit_scale`` clamped and writes the score plot."""

    def __init__(self, trainer: "ContrastiveTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._clamp_logit_scale()

    def on_epoch_begin(self, args, state, control, **kwargs):
        # A checkpoint saved by step at an epoch's last step holds the hook state from *before* that epoch's
        # end update; a run resumed from it starts at the next epoch, so run the missed update(s) now.
        epoch = int(math.floor((state.epoch or 0.0) + 1e-9))
        if self.trainer._epochs_ended < 0:
            self.trainer._epochs_ended = epoch
        for missed in range(self.trainer._epochs_ended, epoch):
            self.trainer._end_epoch(missed)
        self.trainer._epochs_ended = max(self.trainer._epochs_ended, epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._end_epoch(max(0, int(math.ceil(state.epoch - 1e-9)) - 1))

    def on_train_end(self, args, state, control, **kwargs):
        if args.plot_score_distributions and self.trainer.is_world_process_zero():
            self.trainer.save_score_plot()


class ContrastiveTrainer(Trainer):
    """Trains any dual encoder (``get_image_features``/``get_text_features``) with symmetric InfoNCE and a learned
    logit scale, selecting pairs online with ``args.selection_strategy``.

    With ``args.gsc`` a :class:`~hf_mmsel.gsc.hook.GSCHook` built from the ``gsc_*`` arguments runs right after
    selection (it weights the kept pairs); :meth:`gsc_weights` returns its current per-sample weights ``w``. At every
    epoch end its GMM/EMA update runs on every rank (identical buffers, rank 0's result broadcast) and, when batches
    carry ``is_noisy``, diagnostics are logged: mean ``w`` over clean and noisy pairs and the AUROC of ``w``.

    Args (besides ``Trainer``'s): ``hooks``: extra :class:`BatchHook`s run after selection (and GSC);
    ``class_captions``: prompts for zero-shot accuracy in :meth:`evaluate`; ``reference_scores`` /
    ``reference_model``: the fixed reference for ``reference_clipscore`` (a ``[N]`` tensor, or a model scored once
    over the training set). Batches need ``pixel_values``, ``input_ids``, ``attention_mask``, ``sample_idx``; a
    ground-truth ``is_noisy`` is only logged (``selected_noisy_fraction``), never used for training.
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
        prepare_model_for_loss(model, args.loss_type, logit_scale_max=args.logit_scale_max)  # sigmoid: t', b
        super().__init__(model=model, args=args, **kwargs)
        self.class_captions = list(class_captions) if class_captions is not None else None
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
        self.hook: BatchHook = BatchHook()
        self.dist = Dist()
        self._hook_step = 0
        self._epochs_ended = 0  # number of epochs whose hook epoch-end update has run
        self._hook_ready = False
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_counts: dict[str, int] = {}
        self._pending_logs: dict[str, float] = {}
        self.add_callback(_HookCallback(self))

    # ------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _check_dataset(dataset, name: str):
        columns = getattr(dataset, "column_names", None)
        if columns is None:  # iterable or custom dataset: checked by the collator
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

    def _num_samples(self) -> int:
        dataset = self.train_dataset
        data = getattr(dataset, "data", None)
        if data is not None and "sample_idx" in getattr(dataset, "column_names", []):
            import pyarrow.compute as pc

            top = pc.max(data.column("sample_idx")).as_py()
            return int(top) + 1 if top is not None else len(dataset)
        return len(dataset)

    def _build_hooks(self) -> None:
        """Create the selection hook from the arguments and allocate every hook's per-sample state."""
        if self._hook_ready:
            return
        args = self.args
        if args.selection_strategy == "reference_clipscore" and self._reference_scores is None:
            if self._reference_model is None:
                raise ValueError(
                    "selection_strategy 'reference_clipscore' needs reference scores: pass reference_scores=, "
                    "reference_model= or --reference_scores_path"
                )
            self._reference_scores = self.compute_reference_scores(self._reference_model)
        self.selection_hook = SelectionHook(
            args.selection_strategy,
            args.select_rate,
            seed=args.seed if args.selection_seed is None else args.selection_seed,
            warmup_epochs=args.resolved_selection_warmup_epochs,
            ema_beta=args.ema_beta,
            first_visit_fallback=args.first_visit_fallback,
            reference_scores=self._reference_scores,
        )
        if args.gsc:
            self.gsc_hook = self._build_gsc_hook()
        gsc = [self.gsc_hook] if self.gsc_hook is not None else []
        self.hook = HookList([self.selection_hook, *gsc, *self._extra_hooks])
        self.hook.setup(self._num_samples(), self.args.device)
        self.dist = Dist()
        self._hook_ready = True

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
            gamma=a.gsc_gamma, structure=structure, beta=a.gsc_beta, bank_size=a.gsc_bank_size,
            bank_min_weight=a.gsc_bank_min_weight, gmm_max_iter=a.gsc_gmm_max_iter, gmm_tol=a.gsc_gmm_tol,
            gmm_reg_covar=a.gsc_gmm_reg_covar, max_fit_samples=a.gsc_max_fit_samples,
            prob_posterior=a.gsc_prob_posterior, prob_logit_scale=a.gsc_prob_logit_scale,
            seed=a.seed if a.gsc_seed is None else a.gsc_seed,
        )
        if a.gsc_co_training:
            from hf_mmsel.gsc.hook import GSCPlusHook

            return GSCPlusHook(num_networks=unwrap_model(self.model).num_networks, **kwargs)
        return GSCHook(**kwargs)

    @property
    def co_trained(self) -> bool:
        """Whether the model is a :class:`CoTrainedDualEncoder` (per-network losses; GSC+ with ``gsc``)."""
        return isinstance(unwrap_model(self.model), CoTrainedDualEncoder)

    def gsc_weights(self, network: int | None = None) -> torch.Tensor:
        """GSC's current per-sample clean weights ``w`` (``[N]`` float32 on CPU, indexed by ``sample_idx``; all
        ones before the first epoch end). Identical on every rank. GSC+ (``gsc_co_training``): network
        ``network``'s own ``w`` (the weights its *peer* trains with), or by default the mean over networks."""
        if not self.args.gsc:
            raise RuntimeError("gsc_weights() needs ContrastiveTrainingArguments(gsc=True)")
        self._build_hooks()
        if self.args.gsc_co_training:
            weights = self.gsc_hook.weights(network)
        elif network is not None:
            raise ValueError("gsc_weights(network=...) needs gsc_co_training=True (GSC+)")
        else:
            weights = self.gsc_hook.buffers.weight
        return weights.detach().float().cpu().clone()

    def _end_epoch(self, epoch: int) -> None:
        """Every hook's epoch-end update (on every rank) plus GSC diagnostics; logs go into the next log call
        (calling Trainer.log here would reset control.should_log and drop the epoch's training log under
        logging_strategy="epoch")."""
        self._build_hooks()
        self._pending_logs.update(self.hook.on_epoch_end(epoch, self.dist))
        if self.gsc_hook is not None:
            self._pending_logs.update(self._gsc_diagnostics())
        self._epochs_ended = max(self._epochs_ended, epoch + 1)

    def _gsc_diagnostics(self) -> dict[str, float]:
        """Mean ``w`` over known-clean and known-noisy pairs and the AUROC of ``w`` (clean = positive) from the
        ground-truth ``is_noisy`` flags the selection hook recorded; diagnostic only, never used for training."""
        weights = self.gsc_weights()
        logs = {"gsc_epoch_weight_mean": float(weights.mean())}
        noisy = getattr(self.selection_hook, "noisy", None)
        if noisy is None:
            return logs
        noisy = noisy.cpu()
        clean, bad = noisy == 0, noisy == 1
        if bool(clean.any()) and bool(bad.any()):
            from hf_mmsel.metrics.detection import auroc

            known = clean | bad
            logs.update(gsc_weight_mean_clean=float(weights[clean].mean()),
                        gsc_weight_mean_noisy=float(weights[bad].mean()),
                        gsc_weight_auroc=auroc(weights[known].numpy(), clean[known].numpy()))
        return logs

    @torch.no_grad()
    def compute_reference_scores(self, reference_model, dataset=None) -> torch.Tensor:
        """CLIPScores ``100*max(cos, 0)`` of a fixed ``reference_model`` for every ``sample_idx`` of the training
        set (one no-grad pass), for ``reference_clipscore``."""
        from torch.utils.data import DataLoader

        from hf_mmsel.metrics import embed_dataset
        from hf_mmsel.selection import clip_score

        check_dual_encoder(reference_model)
        dataset = self.train_dataset if dataset is None else dataset
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        emb = embed_dataset(reference_model, loader, device=self.args.device)
        scores = torch.zeros(self._num_samples())
        scores[emb["sample_idx"].long()] = clip_score(emb["image_embeds"], emb["text_embeds"])[1]
        return scores

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._build_hooks()
        self._epochs_ended = 0  # restored from the checkpoint when resuming
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # ---------------------------------------------------------------------------------------- the step
    def _score_dtype(self) -> torch.dtype | None:
        choice = self.args.score_dtype
        if choice == "auto":
            return torch.bfloat16 if self.args.device.type == "cuda" else None
        return None if choice == "float32" else getattr(torch, choice)

    def _score_batch(self, model, inputs) -> PairEmbeddings:
        """The no-grad scoring forward of the current model on the full candidate batch."""
        dtype = self._score_dtype()
        autocast = (torch.autocast(device_type=self.args.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            image, text = encode_pair(model, inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask"))
            if self.co_trained:  # ensemble embeddings (mean cosine); scale: the networks' mean
                scale = torch.stack([logit_scale_of(net, max_scale=self.args.logit_scale_max)
                                     for net in unwrap_model(model).networks]).mean()
            else:
                scale = logit_scale_of(model, max_scale=self.args.logit_scale_max)
        return PairEmbeddings(image, text, scale.detach())

    def _embed_for_training(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings with gradient. Under DDP the wrapped ``forward`` must run (it arms the gradient all-reduce),
        so the model's forward output must carry ``image_embeds``/``text_embeds`` (CLIPModel and
        VisionTextDualEncoderModel do); otherwise ``get_*_features`` are called directly."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                        attention_mask=inputs.get("attention_mask"))
            image, text = getattr(out, "image_embeds", None), getattr(out, "text_embeds", None)
            if image is None or text is None:
                raise TypeError(
                    f"{type(unwrap_model(model)).__name__}.forward must return image_embeds and text_embeds for "
                    "multi-process training (DDP needs the forward call)"
                )
            return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        return encode_pair(model, inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask"))

    def _current_epoch(self) -> int:
        return int(math.floor(self.state.epoch + 1e-9)) if self.state.epoch is not None else 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "sample_idx" not in inputs:
            raise KeyError(f"ContrastiveTrainer batches need 'sample_idx'; got {sorted(inputs)}")
        self._build_hooks()
        inputs = dict(inputs)
        size = int(inputs["sample_idx"].shape[0])
        ctx = StepContext(self._current_epoch(), self._hook_step, self.dist,
                          lambda: self._score_batch(model, inputs), loss=pair_loss_for(model, self.args.loss_type))
        training = model.training
        if training:
            keep = self.hook.prepare(inputs, ctx)
            self._hook_step += 1
            if keep is not None:
                inputs = subset_batch(inputs, keep, size)
        if self.co_trained:
            return self._co_training_loss(model, inputs, ctx, training, return_outputs)
        image, text = self._embed_for_training(model, inputs)
        scale = logit_scale_of(model, max_scale=self.args.logit_scale_max)
        per_sample = ctx.loss.per_sample(image, text, scale, gather_fn=self.dist.gather_with_grad, rank=self.dist.rank)
        terms = self.hook.loss_terms(image, text, scale, inputs["sample_idx"], per_sample, ctx)
        loss = (per_sample * terms.weights).mean() if terms.weights is not None else per_sample.mean()
        if terms.extra_loss is not None:
            loss = loss + terms.extra_loss
        if training:
            self._accumulate_logs({**ctx.logs, **terms.logs, "logit_scale": scale.detach(), **ctx.loss.logs()})
        if return_outputs:
            return loss, {"image_embeds": image, "text_embeds": text, "per_sample_loss": per_sample}
        return loss

    def _co_training_loss(self, model, inputs, ctx: StepContext, training: bool, return_outputs: bool):
        """GSC+ step on the kept pairs: network k's per-pair InfoNCE (its own embeddings and logit scale, negatives
        gathered across ranks) with the hooks' terms for ``ctx.network = k`` (GSC+: the peer's ``w``, own ``c``/``p``);
        the loss is the sum over networks, so each network receives exactly its own gradient."""
        out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                    attention_mask=inputs.get("attention_mask"))  # the (DDP-)wrapped forward: per-network embeddings
        networks = unwrap_model(model).networks
        loss, logs, per_network = 0.0, {}, []
        for k, (image, text) in enumerate(zip(out.image_embeds, out.text_embeds)):
            scale = logit_scale_of(networks[k], max_scale=self.args.logit_scale_max)
            ctx.network, ctx.loss = k, pair_loss_for(networks[k], self.args.loss_type)
            per_sample = ctx.loss.per_sample(image, text, scale, gather_fn=self.dist.gather_with_grad,
                                             rank=self.dist.rank)
            try:
                terms = self.hook.loss_terms(image, text, scale, inputs["sample_idx"], per_sample, ctx)
            finally:
                ctx.network = None
            net_loss = (per_sample * terms.weights).mean() if terms.weights is not None else per_sample.mean()
            if terms.extra_loss is not None:
                net_loss = net_loss + terms.extra_loss
            loss = loss + net_loss
            logs.update(terms.logs)
            logs[f"loss_net{k}"] = net_loss.detach()
            logs[f"logit_scale_net{k}"] = scale.detach()
            per_network.append({"image_embeds": image, "text_embeds": text, "per_sample_loss": per_sample})
        if training:
            self._accumulate_logs({**ctx.logs, **logs})
        if return_outputs:
            return loss, {"networks": per_network}
        return loss

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        inner = unwrap_model(self.model)
        for module in (inner.networks if isinstance(inner, CoTrainedDualEncoder) else [inner]):
            raw = getattr(module, "logit_scale", None)
            if isinstance(raw, torch.Tensor):
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
            means = self.dist.gather(means[None]).mean(0)  # same names on every rank; one collective
            logs = {**logs, **{n: round(float(v), 6) for n, v in zip(names, means.tolist())}}
            self._log_sums, self._log_counts = {}, {}
        if self._pending_logs:
            logs, self._pending_logs = {**logs, **self._pending_logs}, {}
        super().log(logs, start_time)

    def save_score_plot(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the clean vs noisy score distributions per epoch (None if nothing was scored)."""
        hook = self.selection_hook
        if hook is None or not hook.epoch_histograms:
            return None
        from hf_mmsel.selection.plot import plot_score_distributions

        path = Path(path) if path is not None else Path(self.args.output_dir) / SCORE_PLOT_NAME
        return plot_score_distributions(hook.epoch_histograms, hook.histogram_epochs, path)

    # ------------------------------------------------------------------------------------ checkpoints
    def hook_state_dict(self) -> dict[str, torch.Tensor]:
        """Every hook's state plus the step counter, as a flat dict of tensors."""
        self._build_hooks()
        state = {k: v.contiguous() for k, v in self.hook.state_dict().items()}
        state[_STEP_KEY] = torch.tensor(self._hook_step, dtype=torch.long)
        state[_EPOCHS_KEY] = torch.tensor(self._epochs_ended, dtype=torch.long)
        return state

    def load_hook_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._build_hooks()
        self._hook_step = int(state[_STEP_KEY])
        # -1 (older checkpoints without the counter): no catch-up of a missed epoch-end update
        self._epochs_ended = int(state[_EPOCHS_KEY]) if _EPOCHS_KEY in state else -1
        state = {k: v for k, v in state.items() if k != _EPOCHS_KEY}
        has_plus = any(k.startswith("1.net0.buffers.") for k in state)
        has_gsc = has_plus or any(k.startswith("1.buffers.") for k in state)
        if self.args.gsc and has_gsc and has_plus != self.args.gsc_co_training:
            trained, now = ("gsc_co_training=True", "False") if has_plus else ("gsc_co_training=False", "True")
            raise ValueError(
                f"this checkpoint holds GSC buffers of a run with {trained}, but gsc_co_training={now}: resume "
                "with the same setting and the same kind of model"
            )
        if self.args.gsc and not has_gsc:
            raise ValueError(
                "this checkpoint holds no GSC buffers (it was trained with gsc=False), but gsc=True: resume with "
                "the same gsc setting, or start a new run"
            )
        if not self.args.gsc and not self._extra_hooks and has_gsc:
            raise ValueError(
                "this checkpoint holds GSC buffers (it was trained with gsc=True), but gsc=False: resume with "
                "--gsc true and the same gsc_* settings"
            )
        self.hook.load_state_dict({k: v for k, v in state.items() if k != _STEP_KEY})

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save``; for a :class:`CoTrainedDualEncoder` (a plain module: Trainer writes its flat state
        dict) also the networks' configs, so the folder loads with ``CoTrainedDualEncoder.from_pretrained``."""
        super()._save(output_dir, state_dict)
        inner = unwrap_model(self.model)
        if isinstance(inner, CoTrainedDualEncoder) and self.args.should_save:
            if all(hasattr(getattr(net, "config", None), "save_pretrained") for net in inner.networks):
                inner.save_configs(output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from safetensors.torch import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if folder.is_dir():
                save_file(self.hook_state_dict(), str(folder / HOOK_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / HOOK_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: this checkpoint was not written by ContrastiveTrainer, so the selection state "
                "(score bank) cannot be restored"
            )
        from safetensors.torch import load_file

        self.load_hook_state_dict(load_file(str(path)))

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Retrieval R@1/5/10 both ways and rsum (percent), plus ``zero_shot_acc`` with ``class_captions``."""
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
