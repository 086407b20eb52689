"""The data-boundary hook protocol of contrastive training (the architecture's "collator/sampler hook").

A :class:`BatchHook` sees every per-device *candidate* batch of a contrastive step before and after the loss,
so that online sample selection (DISSect and its baselines, ``hf_mmsel.selection``) and per-sample
noisy-correspondence weighting (GSC, ``hf_mmsel.gsc``) plug into the trainer without forking its loop. One step
of ``ContrastiveTrainer`` calls, in order::

    keep = hook.prepare(batch, ctx)            # -> local indices to train on (None: keep all). ctx.score()
                                               #    runs (once, cached) the no-grad scoring forward on demand
    v, u = model(batch[keep]) ; s = logit scale
    l = ctx.loss.per_sample(v, u, s, ...)      # [k] per-pair loss (InfoNCE or SigLIP sigmoid), negatives
                                               #    gathered across ranks
    terms = hook.loss_terms(v, u, s, batch["sample_idx"][keep], l, ctx)
    loss = mean(terms.weights * l) + terms.extra_loss
    ...
    hook.on_pass_end(pass_index, dist)         # end of every pass over the pool (e.g. GSC's GMM fit)

(through :class:`~hf_mmsel.state.HookRunner`, which also checkpoints: the per-sample arrays of every hook's
``storage`` one file per rank, re-sharded on resume; ``replicated_state_dict()`` from rank 0;
``rank_state_dict()`` per rank). A pass is one sweep over the pool (``hf_mmsel.state.PassSchedule``): an epoch
map-style, ``ceil(N / (W * B))`` candidate batches streaming. Rules every hook follows:

* **Same k on every rank.** ``prepare`` returns the same number of indices on every rank (the all-gathered
  negatives need equal shapes).
* **Sharded state.** Anything keyed by ``sample_idx`` lives in the hook's namespace ``self.storage`` of the one
  :class:`~hf_mmsel.state.PerSampleState` (set before ``setup``; ``storage.add(name, dtype, fill)``): a rank
  holds only the samples it owns, and the owner-stable data order puts only owned samples in its batches, so
  updates are local. Adding an array is a change to the hook alone: the runner checkpoints and re-shards it. Pass-end updates that need the whole pool
  (GSC's GMM) use collectives that make every rank's result equal to the single-process one.
* **No host syncs per sample.** Vectorised tensor code; logs are tensors (``ctx.log``), read at logging steps.

:class:`HookList` composes hooks: selection first (each ``prepare`` sees the previous one's subset), then
weights multiply and extra losses add.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import torch

from .losses import PairLoss, SoftmaxPairLoss
from .losses import gather_no_grad, gather_with_grad
from .state.ownership import SampleOwnership
from .state.per_sample import PerSampleState, StateNamespace

__all__ = ["BatchHook", "Dist", "HookList", "LossTerms", "PairEmbeddings", "StepContext", "subset_batch"]


class Dist:
    """Collective operations a hook may use; single-process no-ops when ``torch.distributed`` is not initialised."""

    def __init__(self) -> None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if on else 1
        self.rank = dist.get_rank() if on else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order), without gradient."""
        return gather_no_grad(tensor)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather`, with gradients flowing back to every rank's shard."""
        return gather_with_grad(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s value; returns it."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=src)
        return tensor


@dataclass
class PairEmbeddings:
    """L2-normalised embeddings of a batch and the multiplicative logit scale used for them."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor

    def __getitem__(self, keep: torch.Tensor) -> "PairEmbeddings":
        return PairEmbeddings(self.image_embeds[keep], self.text_embeds[keep], self.logit_scale)


@dataclass
class StepContext:
    """What a hook knows about the current step.

    ``epoch``: 0-based epoch; ``step``: number of candidate batches seen before this one (identical on all ranks,
    restored on resume: use it to seed per-step randomness); ``dist``: collectives; ``score()``: embeddings of
    the current candidate batch from a no-grad forward of the current model (computed at most once).
    ``network``: with a co-trained ensemble (GSC+, :class:`~hf_mmsel.models.CoTrainedDualEncoder`)
    ``loss_terms`` is called once per network with ``network = k`` and that network's embeddings; ``None`` for a
    single model. ``loss``: the step's contrastive loss (:class:`~hf_mmsel.losses.PairLoss`: softmax
    InfoNCE by default, or SigLIP's sigmoid loss with its bias ``b``), for hooks that rank or weight pairs by it.
    """

    epoch: int
    step: int
    dist: Dist
    scorer: Callable[[], PairEmbeddings]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    _cache: PairEmbeddings | None = None
    network: int | None = None
    loss: PairLoss = field(default_factory=SoftmaxPairLoss)

    def score(self) -> PairEmbeddings:
        if self._cache is None:
            self._cache = self.scorer()
        return self._cache

    @property
    def scored(self) -> bool:
        """Whether the scoring forward ran for this batch."""
        return self._cache is not None

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar (tensor) metric for this step; the trainer averages it over the logging window."""
        self.logs[name] = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))

    def subset(self, keep: torch.Tensor) -> "StepContext":
        """A context for the sub-batch ``keep`` (shares logs; scoring is sliced from this context's)."""
        return StepContext(self.epoch, self.step, self.dist, lambda: self.score()[keep], self.logs,
                           network=self.network, loss=self.loss)


@dataclass
class LossTerms:
    """Per-sample weights for the InfoNCE terms (``None``: all ones), an extra scalar loss and tensor logs."""

    weights: torch.Tensor | None = None
    extra_loss: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def subset_batch(batch: Mapping[str, object], keep: torch.Tensor, batch_size: int) -> dict[str, object]:
    """Index every per-sample tensor (first dim ``batch_size``) of ``batch`` with ``keep``; others are copied."""
    out: dict[str, object] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            out[key] = value[keep.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == batch_size:  # e.g. streaming "key" strings
            out[key] = [value[i] for i in keep.tolist()]
        else:
            out[key] = value
    return out


class BatchHook:
    """Base class with no-op defaults; subclasses override what they need (see the module docstring).

    Persistence is split by who owns what: per-sample arrays live in ``storage`` (the hook's namespace of the
    sharded :class:`~hf_mmsel.state.PerSampleState`, set by :class:`HookList` before :meth:`setup`), which the
    :class:`~hf_mmsel.state.HookRunner` saves, loads and re-shards; a hook returns only its replicated state
    (:meth:`replicated_state_dict`, e.g. an anchor bank) and its per-rank state (:meth:`rank_state_dict`, e.g. a
    FIFO of pending records). :meth:`state_dict` is the sum of the first two, for single-process use.
    """

    state_kind: ClassVar[str | None] = None  # recorded in checkpoints (default: the class name)
    storage: StateNamespace | None = None  # this hook's namespace of the per-sample state (HookList sets it)

    def setup(self, num_samples: int, device: torch.device) -> None:
        """Allocate per-sample state for ``sample_idx`` in ``[0, num_samples)`` (called at train start): arrays
        added to ``self.storage`` are checkpointed by the runner."""

    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        """Return local indices of the pairs to train on (same count on every rank), or ``None`` to keep all."""
        return None

    def loss_terms(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        sample_idx: torch.Tensor,
        per_sample_loss: torch.Tensor,
        ctx: StepContext,
    ) -> LossTerms:
        """Per-sample weights / extra loss for the kept pairs (embeddings carry gradient)."""
        return LossTerms()

    def on_pass_end(self, pass_index: int, dist: Dist) -> dict[str, float]:
        """End-of-pass update (must leave identical state on every rank); returns scalar logs."""
        if type(self).on_epoch_end is not BatchHook.on_epoch_end:  # a hook written against the old name
            warnings.warn(f"{type(self).__name__}.on_epoch_end is deprecated and will be removed in the next release; "
                          "implement on_pass_end(pass_index, dist)", FutureWarning, stacklevel=2)
            return type(self).on_epoch_end(self, pass_index, dist)
        return {}

    def on_epoch_end(self, epoch: int, dist: Dist) -> dict[str, float]:
        """Deprecated name of :meth:`on_pass_end` ("epoch" meant a pass over the pool)."""
        warnings.warn("BatchHook.on_epoch_end is deprecated and will be removed in the next release; call "
                      "on_pass_end(pass_index, dist)", FutureWarning, stacklevel=2)
        return self.on_pass_end(epoch, dist)

    # ------------------------------------------------------------------------------------------- state
    def use_storage(self, num_samples: int, device: torch.device | str,
                    storage: StateNamespace | None = None) -> StateNamespace:
        """Set and return the namespace this hook allocates in: ``storage`` when given, else the one
        :class:`HookList` attached, else (a hook used on its own) a one-process state of its own."""
        if storage is None:
            storage = self.storage
        if storage is None or storage.ownership.num_samples != num_samples:
            prefix = self.state_kind or type(self).__name__
            storage = PerSampleState(SampleOwnership.single(num_samples), device).namespace(prefix)
        self.storage = storage
        return storage

    def replicated_state_dict(self) -> dict[str, torch.Tensor]:
        """State that is the same on every rank and not per sample (saved once, by rank 0)."""
        return {}

    def load_replicated_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`replicated_state_dict`."""

    def rank_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state that is not per sample (saved in the rank's own file)."""
        return {}

    def load_rank_state_dicts(self, states: Sequence[Mapping[str, torch.Tensor]], exact: bool = True,
                              step: int | None = None) -> None:
        """Restore :meth:`rank_state_dict`: ``[this rank's]`` (``exact``: same world size and step numbering) or
        the dicts of every old rank after a world-size change, at candidate-batch counter ``step``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-sample arrays (names relative to ``storage``) plus :meth:`replicated_state_dict`."""
        arrays = self.storage.state_dict() if self.storage is not None else {}
        return {**arrays, **self.replicated_state_dict()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        arrays = self.storage.arrays() if self.storage is not None else {}
        if self.storage is not None:
            self.storage.load_state_dict(state)
        self.load_replicated_state_dict({k: v for k, v in state.items() if k not in arrays})


class HookList(BatchHook):
    """Composition of hooks: selection hooks first, then weighting hooks. State keys are prefixed ``"{i}."``."""

    def __init__(self, hooks: Sequence[BatchHook]) -> None:
        self.hooks = list(hooks)

    def setup(self, num_samples: int, device: torch.device, state: PerSampleState | None = None) -> None:
        """Allocate every hook's per-sample arrays: hook ``i`` gets the namespace ``"{i}"`` of ``state`` (default:
        a one-process :class:`~hf_mmsel.state.PerSampleState`) as its ``storage``."""
        if state is None:
            state = PerSampleState(SampleOwnership.single(num_samples), device)
        for i, hook in enumerate(self.hooks):
            hook.storage = state.namespace(str(i))
            hook.setup(num_samples, device)

    def state_kinds(self) -> list[str]:
        """One name per hook (``state_kind`` or the class name): recorded in checkpoints, compared on resume."""
        return [hook.state_kind or type(hook).__name__ for hook in self.hooks]

    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        keep_total: torch.Tensor | None = None
        size = int(batch["sample_idx"].shape[0])
        for hook in self.hooks:
            keep = hook.prepare(batch, ctx)
            if keep is None:
                continue
            keep_total = keep if keep_total is None else keep_total[keep]
            batch, ctx = subset_batch(batch, keep, size), ctx.subset(keep)
            size = int(keep.shape[0])
        return keep_total

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx) -> LossTerms:
        total = LossTerms()
        for hook in self.hooks:
            terms = hook.loss_terms(image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx)
            if terms.weights is not None:
                total.weights = terms.weights if total.weights is None else total.weights * terms.weights
            if terms.extra_loss is not None:
                total.extra_loss = terms.extra_loss if total.extra_loss is None else total.extra_loss + terms.extra_loss
            total.logs.update(terms.logs)
        return total

    def on_pass_end(self, pass_index: int, dist: Dist) -> dict[str, float]:
        logs: dict[str, float] = {}
        for hook in self.hooks:
            logs.update(hook.on_pass_end(pass_index, dist))
        return logs

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, hook in enumerate(self.hooks) for k, v in hook.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for i, hook in enumerate(self.hooks):
            prefix = f"{i}."
            hook.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
