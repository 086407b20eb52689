"""``HookRunner``: the hook chain plus everything around it that must agree across ranks and survive a resume.

It owns the :class:`~hf_mmsel.hooks.HookList` (selection first, then weighting), the one sharded
:class:`~hf_mmsel.state.PerSampleState`, the candidate-batch counter ``step`` (seeds per-step randomness), the
:class:`~hf_mmsel.state.PassSchedule` and the number of passes whose end-of-pass update has run. A trainer calls::

    runner.setup(num_samples, ownership, device, schedule)       # once, at train start
    ctx = runner.context(scorer); keep = runner.prepare(batch, ctx)   # each candidate batch
    terms = runner.loss_terms(v, u, s, idx, l, ctx)
    logs = runner.end_completed_passes()                          # after each optimizer step
    runner.save(checkpoint_dir, global_step, meta) / runner.load(checkpoint_dir, global_step)

and needs no knowledge of hook order, state keys or file layout. Plain torch; no Trainer import.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from ..losses import PairLoss
from ..hooks import BatchHook, Dist, HookList, LossTerms, PairEmbeddings, StepContext
from .checkpoint import load_rank_local, read_index
from .ownership import SampleOwnership
from .per_sample import PerSampleState, gather_global
from .schedule import PassSchedule

__all__ = ["HookRunner", "require_process_group"]


def require_process_group(expected_world_size: int) -> Dist:
    """A :class:`Dist` for ``expected_world_size`` processes; raises when several processes run without a usable
    ``torch.distributed`` process group (each rank would silently keep its own state and local-only negatives)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = Dist()
    expected = max(int(expected_world_size), env_world)
    if expected > 1 and dist.world_size != expected:
        raise RuntimeError(
            f"{expected} processes are configured (TrainingArguments.world_size / WORLD_SIZE) but the torch process "
            f"group has {dist.world_size}: per-sample state is sharded across ranks and negatives are gathered, so "
            "a usable process group is required (launch with accelerate launch / torchrun)"
        )
    return dist


class HookRunner:
    """Hooks + sharded per-sample state + step/pass counters (see the module docstring)."""

    def __init__(self, hooks: list[BatchHook], settings: Mapping[str, Any] | None = None) -> None:
        self.hooks = HookList(hooks)
        self.settings = dict(settings or {})  # compared on resume (e.g. gsc, gsc_co_training, strategy)
        self.state: PerSampleState | None = None
        self.schedule: PassSchedule | None = None
        self.dist = Dist()
        self.step = 0
        self.passes_ended = 0
        self.scoring_forwards = 0  # no-grad scoring forwards run (ctx.score() computed), not checkpointed

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, num_samples: int, ownership: SampleOwnership, device: torch.device | str,
              schedule: PassSchedule, dist: Dist | None = None) -> None:
        self.dist = dist or Dist()
        if ownership.world_size != self.dist.world_size or ownership.rank != self.dist.rank:
            raise RuntimeError(f"ownership {ownership} does not match the process group "
                               f"(rank {self.dist.rank} of {self.dist.world_size})")
        self.state = PerSampleState(ownership, device)
        self.hooks.setup(num_samples, torch.device(device), state=self.state)
        self.schedule = schedule
        self.step, self.passes_ended = 0, 0

    @property
    def ready(self) -> bool:
        return self.state is not None

    @property
    def ownership(self) -> SampleOwnership:
        return self._require().ownership

    def _require(self) -> PerSampleState:
        if self.state is None:
            raise RuntimeError("HookRunner.setup(...) must run before training")
        return self.state

    @property
    def current_pass(self) -> int:
        return self.schedule.pass_of(self.step) if self.schedule is not None else 0

    def state_bytes_per_rank(self) -> int:
        return self._require().nbytes()

    # -------------------------------------------------------------------------------------------------- step
    def context(self, scorer: Callable[[], PairEmbeddings], loss: PairLoss | None = None) -> StepContext:
        """The step's context; ``loss`` is the step's contrastive loss (default: softmax InfoNCE)."""
        def counted() -> PairEmbeddings:
            self.scoring_forwards += 1
            return scorer()

        ctx = StepContext(self.current_pass, self.step, self.dist, counted)
        if loss is not None:
            ctx.loss = loss
        return ctx

    def prepare(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> torch.Tensor | None:
        """The hooks' selection for one candidate batch; advances the candidate-batch counter."""
        self._require()
        keep = self.hooks.prepare(batch, ctx)
        self.step += 1
        return keep

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx) -> LossTerms:
        return self.hooks.loss_terms(image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx)

    def end_completed_passes(self) -> dict[str, float]:
        """Run the end-of-pass update of every pass completed since the last call (on every rank)."""
        logs: dict[str, float] = {}
        if self.schedule is None:
            return logs
        while self.passes_ended < self.schedule.pass_of(self.step):
            logs.update(self.hooks.on_pass_end(self.passes_ended, self.dist))
            self.passes_ended += 1
        return logs

    def gathered(self, name: str, fill: float = 0.0) -> torch.Tensor:
        """The full ``[N]`` per-sample array ``name`` (e.g. ``"1.buffers.weight"``) on every rank."""
        state = self._require()
        return gather_global(state[name], state.ownership, fill)

    def gather_local(self, local: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A full ``[N]`` array from a local ``[num_local]`` one (collective on every rank)."""
        return gather_global(local, self._require().ownership, fill)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _per_hook(self, method: str) -> dict[str, torch.Tensor]:
        """Every hook's ``replicated_state_dict`` / ``rank_state_dict``, keys prefixed ``"{i}."``."""
        return {f"{i}.{k}": v for i, hook in enumerate(self.hooks.hooks) for k, v in getattr(hook, method)().items()}

    def save(self, checkpoint_dir: str | os.PathLike, global_step: int, meta: Mapping[str, Any] | None = None):
        """Write this rank's shard of every per-sample array and the hooks' per-rank state (every rank), then
        rank 0 the hooks' replicated state and ``index.json``."""
        state = self._require()
        index_meta = {"step": int(global_step), "hook_step": self.step, "passes_ended": self.passes_ended,
                      "batches_per_pass": self.schedule.batches_per_pass if self.schedule else None,
                      "hooks": self.hooks.state_kinds(), "settings": self.settings,
                      "state_bytes_per_rank": state.nbytes(), **dict(meta or {})}
        return state.save(checkpoint_dir, replicated=self._per_hook("replicated_state_dict"), meta=index_meta,
                          rank_local=self._per_hook("rank_state_dict"))

    def check_compatible(self, index: Mapping[str, Any]) -> None:
        """Named errors when a checkpoint was written with other hook settings than this run's."""
        for key, value in self.settings.items():
            saved = index.get("settings", {}).get(key, value)
            if saved != value:
                raise ValueError(
                    f"this checkpoint was trained with {key}={saved}, but this run has {key}={value}: resume with "
                    "the same setting, or start a new run"
                )
        if list(index.get("hooks", [])) != self.hooks.state_kinds():
            raise ValueError(f"this checkpoint holds the state of hooks {index.get('hooks')}, this run builds "
                             f"{self.hooks.state_kinds()}: resume with the same hooks")

    def load(self, checkpoint_dir: str | os.PathLike, global_step: int | None = None) -> dict[str, Any]:
        """Restore from ``checkpoint_dir/hook_state`` (re-sharding if the world size changed); the saved step
        must equal ``global_step`` when given."""
        state = self._require()
        index = read_index(checkpoint_dir)
        self.check_compatible(index)
        if global_step is not None and int(index["step"]) != int(global_step):
            raise ValueError(f"hook state in {checkpoint_dir} was saved at step {index['step']}, the trainer "
                             f"resumed at step {global_step}")
        index, replicated = state.load(checkpoint_dir)  # every per-sample array, re-sharded if needed
        for i, hook in enumerate(self.hooks.hooks):
            hook.load_replicated_state_dict(_strip(replicated, f"{i}."))
        self.step, self.passes_ended = int(index["hook_step"]), int(index["passes_ended"])
        renumbered = False
        if self.schedule is not None and index.get("batches_per_pass") not in (None, self.schedule.batches_per_pass):
            # another world size or batch size: continue at the same fraction of the pool
            old = int(index["batches_per_pass"])
            self.step = (self.step * self.schedule.batches_per_pass) // old
            renumbered = True
        rank_local = load_rank_local(checkpoint_dir, state.ownership)
        exact = len(rank_local) == 1 and not renumbered  # same world size and step numbering
        for i, hook in enumerate(self.hooks.hooks):
            hook.load_rank_state_dicts([_strip(d, f"{i}.") for d in rank_local], exact=exact, step=self.step)
        return index


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
