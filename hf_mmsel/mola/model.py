"""`MolaModel(BaseTuner)`: injects MoLA layers, routes each sample to its experts, holds the router and TwD head.

Per-sample ``task_ids`` cannot reach a third-party tuner through ``PeftModel`` (docs/design.md, MoLA §6.3), so a forward
pre-hook on the wrapped model takes ``task_ids`` (alias ``mola_task_ids`` for PeftModelFor* task classes) from the
kwargs, validates them, runs the router (``routing="router"``, keeping its logits for TwD) and writes the per-sample
gates onto every MoLA layer. The ids are popped, unless the wrapped model's ``forward`` declares a ``task_ids``
parameter (e.g. a multi-task model that picks per-task heads): then it receives them too, also when given as
``mola_task_ids`` (signature inspected once, when the hook is registered). Usage::

    import hf_mmsel  # registers peft_type "MOLA"
    from peft import get_peft_model
    model = get_peft_model(base, hf_mmsel.MolaConfig(num_experts=3, target_modules=["fc1", "fc2"]))
    out = model(x, task_ids=torch.tensor([0, 2, 1]))        # MoLA-Grad, one pass for a mixed batch
    loss = task_loss + model.base_model.mola_aux_loss(task_ids)   # TwD, routing="router" (0 in task mode)
    with model.base_model.routing(task_ids=1):              # generate() and other non-forward paths
        model.generate(...)

The router and the (fixed, non-parameter) TwD projection live in a ``MolaRouterLayer`` attached to the adapted model
as ``model.mola_routing`` (``ModuleDict``s ``mola_router``, ``mola_twd_proj`` keyed by adapter). It is a peft
``BaseTunerLayer``, so ``inject_adapter_in_model``/``model.add_adapter`` keep it and peft's requires-grad, dtype and
state-dict bookkeeping covers it. ``tuner.mola_router`` / ``tuner.mola_twd_proj`` are views of those dicts.
Several active adapters (``set_adapter([...])`` on the tuner, or on the layers as peft's multi-adapter API does) are
each routed, with their own gates (task or router), and their deltas are summed, as LoRA does.
``nn.DataParallel`` is not supported (as for LoRA's ``adapter_names``); DDP/FSDP are.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import get_pattern_key
from torch import nn

from .config import MolaConfig
from .layer import Conv2d, Linear, MolaLayer, MolaMergedTaskError, TaskGroups, TransientCache, is_conv1d
from .router import ROUTER_LAYER_NAME, MolaRouter, MolaRouterLayer, TwdProjection, pool_features, run_router
from .router_input import (
    ROUTER_INPUT_KWARGS,
    forward_parameter_names,
    input_embedding,
    router_input_from,
    router_input_spec,
    router_module,
)
from .twd import task_wise_decorrelation_loss

TASK_IDS_KWARGS = ("task_ids", "mola_task_ids")
_TUNER_DICTS = ("mola_router", "mola_twd_proj")
_PER_POSITION_KWARGS = ("cache_position", "position_ids", "labels")


class MolaModel(BaseTuner):
    """MoLA tuner (Zhou et al., ICML 2024): MoLA-Grad (``routing="task"``) and MoLA-Router (``routing="router"``)."""

    prefix: str = "mola_"
    tuner_layer_cls = MolaLayer
    target_module_mapping: dict[str, list[str]] = {}

    # --- injection --------------------------------------------------------------------------------------------------
    def _create_and_replace(
        self,
        mola_config: MolaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        r_key = get_pattern_key(mola_config.rank_pattern.keys(), current_key)
        a_key = get_pattern_key(mola_config.alpha_pattern.keys(), current_key)
        r = mola_config.rank_pattern.get(r_key, mola_config.r)
        alpha = mola_config.alpha_pattern.get(a_key, mola_config.lora_alpha)
        if isinstance(target, MolaLayer):
            target.update_layer(adapter_name, mola_config, r, alpha)
            return
        new_module = self._create_new_module(mola_config, adapter_name, target, r, alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: MolaConfig, adapter_name: str, target: nn.Module, r: int, alpha: float):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear) or is_conv1d(base):
            return Linear(target, adapter_name, config, r, alpha)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config, r, alpha)
        raise TypeError(
            f"MoLA cannot adapt a {type(base).__name__}; supported modules: nn.Linear, transformers Conv1D, nn.Conv2d. "
            "Check `target_modules`."
        )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """peft injection, then this adapter's tuner-level modules (router, TwD projection) and the routing hook.

        Done here rather than in ``_pre/_post_injection_hook`` so that ``add_adapter``/``load_adapter`` also get them.
        """
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._init_mola_state()
        config = self.peft_config[adapter_name]
        if config.routing == "router":
            first_layer = next(iter(self._mola_layers(adapter_name)))
            kind, in_features = router_input_spec(self.model, config, first_layer.get_base_layer())
            first = first_layer.mola_A[adapter_name]
            holder = self._ensure_router_layer()
            holder.mola_router[adapter_name] = MolaRouter(
                in_features,
                config.num_experts,
                hidden=config.router_hidden,
                kind=kind,
                temperature=config.router_temperature,
                top_k=config.router_top_k,
            ).to(first.device, dtype=first.dtype)  # the experts' dtype; peft's autocast upcasts both alike
            holder.mola_twd_proj[adapter_name] = TwdProjection(
                config.num_experts, config.twd_proj_dim, torch.Generator().manual_seed(0)
            ).to(first.device)
            holder.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
            if not self._adapters_enabled:
                holder.enable_adapters(False)
            # the router's module hook: a module: router always routes there; an input router on the input embedding
            # when the model input is integer ids (set per forward in _embedding_routed)
            module = router_module(self.model, config) if config.router_input != "input" else input_embedding(model)
            if module is not None and adapter_name not in self._module_hooks:
                self._module_hooks[adapter_name] = module.register_forward_hook(
                    self._make_router_module_hook(adapter_name)
                )
        if self._pre_hook_handle is None:
            self._forward_accepts = forward_parameter_names(model)
            self._pre_hook_handle = model.register_forward_pre_hook(self._routing_pre_hook, with_kwargs=True)
            self._wrap_generate(model)

    def _wrap_generate(self, model: nn.Module) -> None:
        """Give a transformers model's ``generate`` a ``task_ids=`` argument (alias ``mola_task_ids``): every
        generated token of row b is routed to expert ``task_ids[b]`` (KV cache on or off). transformers rejects
        unknown generate kwargs, so the ids are taken out and applied through :meth:`routing` for the whole decode,
        repeated like the input rows (``max(num_beams, num_return_sequences)``)."""
        original = getattr(model, "generate", None)
        if not callable(original) or getattr(original, "_mola_wrapped", False):
            return
        tuner = self

        def generate(*args: Any, **kwargs: Any):
            given = [kwargs.pop(k) for k in TASK_IDS_KWARGS if kwargs.get(k) is not None]
            for key in TASK_IDS_KWARGS:
                kwargs.pop(key, None)
            if len(given) > 1:
                raise ValueError("Pass either `task_ids` or `mola_task_ids` to generate, not both.")
            if not given:
                return original(*args, **kwargs)
            task_ids = tuner._validate_task_ids(given[0], None)
            if task_ids.numel() > 1:
                config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
                beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
                returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
                task_ids = task_ids.repeat_interleave(max(int(beams), int(returns)))  # as transformers expands
            with tuner.routing(task_ids=task_ids):
                return original(*args, **kwargs)

        generate._mola_wrapped = True
        generate.__wrapped__ = original
        generate.__doc__ = (original.__doc__ or "") + "\n\nMoLA: ``task_ids=`` routes each row to its task's expert."
        model.__dict__["generate"] = generate

    def _ensure_router_layer(self) -> MolaRouterLayer:
        holder = getattr(self.model, ROUTER_LAYER_NAME, None)
        if holder is None:
            holder = MolaRouterLayer(owner=self.model)
            self.model.add_module(ROUTER_LAYER_NAME, holder)
        return holder

    @property
    def router_layer(self) -> Optional[MolaRouterLayer]:
        """The ``MolaRouterLayer`` on the adapted model (None without router adapters)."""
        holder = self.model._modules.get(ROUTER_LAYER_NAME) if "model" in self._modules else None
        return holder if isinstance(holder, MolaRouterLayer) else None

    @property
    def mola_router(self) -> nn.ModuleDict:
        """Routers per adapter (``model.mola_routing.mola_router``)."""
        holder = self.router_layer
        return holder.mola_router if holder is not None else nn.ModuleDict()

    @property
    def mola_twd_proj(self) -> nn.ModuleDict:
        """Fixed TwD projections per adapter (``model.mola_routing.mola_twd_proj``)."""
        holder = self.router_layer
        return holder.mola_twd_proj if holder is not None else nn.ModuleDict()

    def _init_mola_state(self) -> None:
        if getattr(self, "_mola_state_ready", False):
            return
        self._mola_state_ready = True
        self._pre_hook_handle = None
        self._forward_accepts: frozenset[str] = frozenset()
        self._module_hooks: dict[str, Any] = {}
        self._last_router_logits: dict[str, torch.Tensor] = TransientCache()
        self._last_task_ids: Optional[torch.Tensor] = None
        self._context_task_ids: Optional[torch.Tensor] = None
        self._adapters_enabled = True
        self._embedding_routed: set[str] = set()  # input routers that route on the embedding output this forward

    def _mola_layers(self, adapter_name: Optional[str] = None) -> Iterator[MolaLayer]:
        """The MoLA layers of the model (optionally: those holding ``adapter_name``)."""
        for module in self.model.modules():
            if isinstance(module, MolaLayer) and (adapter_name is None or adapter_name in module.mola_A):
                yield module

    # --- peft bookkeeping of the router layer ---------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        holder = self.router_layer
        if holder is not None:  # peft's set_adapter only visits MolaLayer instances
            holder.set_adapter(adapter_name, inference_mode=inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)  # visits every BaseTunerLayer, the router layer included
        self._adapters_enabled = enabled

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        holder = self.router_layer
        if holder is not None:  # peft's delete_adapter skips modules whose name contains the prefix
            holder.delete_adapter(adapter_name)
        handle = self._module_hooks.pop(adapter_name, None)
        if handle is not None:
            handle.remove()
        self._last_router_logits.pop(adapter_name, None)
        for layer in self._mola_layers():
            layer._routing.pop(adapter_name, None)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Also strip the adapter name after ``mola_router`` / ``mola_twd_proj`` (``mola_router.<adapter>.net...``)."""
        for attr in _TUNER_DICTS:
            marker = f"{attr}.{adapter_name}."
            if key.startswith(marker) or f".{marker}" in key:
                return re.sub(rf"(^|\.){attr}\.{re.escape(adapter_name)}\.", rf"\g<1>{attr}.", key, count=1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # --- routing ----------------------------------------------------------------------------------------------------
    def _active_configs(self) -> list[tuple[str, MolaConfig]]:
        """The adapters to route: the tuner's active adapters and those activated on MoLA layers directly
        (``layer.set_adapter([...])``, as peft's multi-adapter API does); each gets its own routing."""
        names = list(self.active_adapters)
        for layer in self._mola_layers():
            names.extend(n for n in layer.active_adapters if n not in names)
        return [(n, self.peft_config[n]) for n in names if n in self.peft_config]

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
        """Batch size of a forward call: the first positional tensor, else a known input kwarg, else the first
        tensor kwarg that is not per-position (generation passes ``cache_position`` [T] before ``input_ids``)."""
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            return args[0].shape[0]
        for key in ("input_ids", "inputs_embeds", "attention_mask") + ROUTER_INPUT_KWARGS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
        for key, value in kwargs.items():
            if key not in _PER_POSITION_KWARGS and isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
        return None

    def _validate_task_ids(self, task_ids: Any, batch_size: Optional[int]) -> torch.Tensor:
        if not isinstance(task_ids, torch.Tensor):
            try:
                task_ids = torch.as_tensor(task_ids)
            except (TypeError, ValueError) as err:
                raise TypeError(f"`task_ids` must be a LongTensor of task indices, got {type(task_ids).__name__}.") from err
        if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
            raise TypeError(f"`task_ids` must be an integer tensor (torch.long), got dtype {task_ids.dtype}.")
        if task_ids.dim() > 1:
            raise ValueError(f"`task_ids` must be a scalar or 1-D [batch], got shape {tuple(task_ids.shape)}.")
        task_ids = task_ids.reshape(-1).long()
        if batch_size is not None and task_ids.numel() not in (1, batch_size):
            raise ValueError(
                f"`task_ids` has {task_ids.numel()} entries but the batch has {batch_size} samples "
                "(give one task id per sample, or a single id for the whole batch)."
            )
        for name, config in self._active_configs():
            if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= config.num_experts):
                raise ValueError(
                    f"`task_ids` out of range: got values in [{int(task_ids.min())}, {int(task_ids.max())}] but "
                    f"adapter {name!r} has num_experts={config.num_experts} (valid ids: 0..{config.num_experts - 1})."
                )
        return task_ids

    def _write_task_gates(self, task_ids: torch.Tensor) -> None:
        for name, config in self._active_configs():
            if config.routing != "task":
                continue
            gates = groups = None
            for layer in self._mola_layers(name):
                if gates is None or gates.device != layer.mola_A[name].device:
                    ids = task_ids.to(layer.mola_A[name].device)
                    gates = nn.functional.one_hot(ids, config.num_experts).to(layer.mola_A[name].dtype)
                    # grouping by task for the grad-free serving path (Linear layers), once per forward
                    groups = TaskGroups(ids) if not torch.is_grad_enabled() else None
                layer.set_routing(name, gates, ids, groups)

    def _write_router_gates(self, adapter_name: str, router_input: Any) -> None:
        logits, gates = run_router(self.mola_router[adapter_name], router_input)
        self._last_router_logits[adapter_name] = logits
        for layer in self._mola_layers(adapter_name):
            layer.set_routing(adapter_name, gates.to(layer.mola_A[adapter_name].device), None)

    def _routing_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # a root forward with its own `task_ids` parameter (e.g. per-task heads) still receives the ids
        given = {
            k: (kwargs[k] if k in self._forward_accepts else kwargs.pop(k)) for k in TASK_IDS_KWARGS if k in kwargs
        }
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise ValueError("Pass either `task_ids` or `mola_task_ids`, not both.")
        task_ids = next(iter(given.values()), None)
        if "mola_task_ids" in given and "task_ids" in self._forward_accepts and kwargs.get("task_ids") is None:
            kwargs["task_ids"] = task_ids  # the alias (for PeftModelFor* classes that swallow `task_ids`)
        if task_ids is None:
            task_ids = self._context_task_ids
        configs = self._active_configs()
        if not self._adapters_enabled or not configs:
            return args, kwargs
        batch_size = self._batch_size(args, kwargs)
        self._embedding_routed.clear()
        for layer in self._mola_layers():  # no gates survive from an earlier forward (stale routing)
            layer._routing.clear()
            layer._groups.clear()
        if task_ids is not None:
            task_ids = self._validate_task_ids(task_ids, batch_size)
        merged = self.merged_tasks()
        if merged:  # the merged weights serve one task: refuse a batch routed elsewhere, LoRA-style
            self._check_merged_routing(merged, task_ids)
            self._last_task_ids = task_ids
            return args, kwargs
        if task_ids is not None:
            self._write_task_gates(task_ids)
        elif any(c.routing == "task" for _, c in configs):
            names = [n for n, c in configs if c.routing == "task"]
            raise ValueError(
                f"MoLA adapter(s) {names} use routing='task' and need `task_ids`: call the model with "
                "`task_ids=<LongTensor [batch]>` (alias `mola_task_ids`), or use "
                "`with model.base_model.routing(task_ids=...)`."
            )
        self._last_task_ids = task_ids
        for name, config in configs:
            if config.routing != "router":
                continue
            router_input = router_input_from(args, kwargs) if config.router_input == "input" else None
            if router_input is not None and router_input.is_floating_point():
                self._write_router_gates(name, router_input)
            elif router_input is not None and name not in self._module_hooks:  # ids, no embedding: read as floats
                self._write_router_gates(name, router_input.float())
            else:  # gates come from the router module's forward hook; stale gates must not be used
                if router_input is not None:
                    self._embedding_routed.add(name)
                for layer in self._mola_layers(name):
                    layer._routing.pop(name, None)
        return args, kwargs

    def _make_router_module_hook(self, adapter_name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            config = self.peft_config.get(adapter_name)
            if config is None or not self._adapters_enabled:
                return
            if config.router_input == "input" and adapter_name not in self._embedding_routed:
                return  # an input router on float inputs: routed by the pre-hook
            if adapter_name in dict(self._active_configs()):
                self._write_router_gates(adapter_name, pool_features(output))

        return hook

    def merged_tasks(self) -> dict[str, int]:
        """Adapter name -> the task whose expert is merged into the base weights (empty when nothing is merged)."""
        merged: dict[str, int] = {}
        for layer in self._mola_layers():
            merged.update(layer.merged_task)
        return merged

    def _check_merged_routing(self, merged: dict[str, int], task_ids: Optional[torch.Tensor]) -> None:
        if task_ids is None:
            return
        for name, task in merged.items():
            other = task_ids[task_ids != task]
            if other.numel():
                raise MolaMergedTaskError(
                    f"MoLA adapter {name!r} has the expert of task {task} merged into the base weights, but the batch "
                    f"routes samples to task(s) {sorted(set(other.tolist()))}: the merged model serves task {task} "
                    "only. Call `unmerge_adapter()` (or `merge_task(<other task>)`) first, or route this batch "
                    "unmerged."
                )

    @contextmanager
    def routing(self, task_ids: Any = None) -> Iterator[None]:
        """Route every forward inside the block with ``task_ids`` (a scalar id routes the whole batch): for
        ``generate()`` or calls that bypass the model's ``forward`` (e.g. ``get_image_features``)."""
        previous = self._context_task_ids
        self._context_task_ids = None if task_ids is None else self._validate_task_ids(task_ids, None)
        if self._context_task_ids is not None:
            merged = self.merged_tasks()
            if merged:
                self._check_merged_routing(merged, self._context_task_ids)
            else:
                self._write_task_gates(self._context_task_ids)
        try:
            yield
        finally:
            self._context_task_ids = previous

    @property
    def last_router_logits(self) -> dict[str, torch.Tensor]:
        """Router logits of the latest forward, per router adapter."""
        return dict(self._last_router_logits)

    def mola_aux_loss(self, task_ids: Any = None) -> torch.Tensor:
        """``sum over active router adapters of twd_weight * TwD(proj(latest logits), task_ids)``; 0 in task mode."""
        total = None
        for name, config in self._active_configs():
            if config.routing != "router" or config.twd_weight == 0:
                continue
            logits = self._last_router_logits.get(name)
            if logits is None:
                raise RuntimeError(f"No router logits for adapter {name!r}: run a forward pass before mola_aux_loss.")
            ids = task_ids if task_ids is not None else self._last_task_ids
            if ids is None:
                raise ValueError("mola_aux_loss needs `task_ids` (the task of each sample of the latest batch).")
            ids = self._validate_task_ids(ids, logits.shape[0]).to(logits.device)
            if ids.numel() == 1:
                ids = ids.expand(logits.shape[0])
            loss = config.twd_weight * task_wise_decorrelation_loss(
                logits, ids, self.mola_twd_proj[name], config.twd_temperature, config.twd_average
            )
            total = loss if total is None else total + loss
        if total is None:
            device = next(self.model.parameters()).device
            return torch.zeros((), device=device)
        return total

    # --- merge / unload -------------------------------------------------------------------------------------------
    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = adapter_names or self.active_adapters
        for name in names:
            config = self.peft_config[name]
            if config.routing == "router" and config.num_experts > 1:
                raise ValueError(
                    f"MoLA adapter {name!r} uses routing='router': its gates depend on the input, so it cannot be "
                    "merged into the base weights."
                )
        return list(names)

    def merge_task(self, task_id: int, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge expert ``task_id`` into the base weights (the model then serves task ``task_id`` only; a batch routed
        to another task raises :class:`MolaMergedTaskError`). Merging another task later swaps the merged expert."""
        names = self._check_mergeable(adapter_names)
        self._check_merge_allowed()
        for layer in self._mola_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=names, task_id=task_id)

    def merge_adapter(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, task_id: Optional[int] = None
    ) -> None:
        """peft's ``merge_adapter`` for MoLA: merges expert ``task_id`` (may be omitted when E == 1); a router adapter
        cannot merge (its gates depend on the input)."""
        names = self._check_mergeable(adapter_names)
        if task_id is None and any(self.peft_config[n].num_experts > 1 for n in names):
            raise ValueError(
                "MoLA merges one task's expert: pass `merge_adapter(task_id=...)`, or use "
                "`model.base_model.merge_task(task_id)` / `merge_and_unload(task_id=...)`."
            )
        self.merge_task(0 if task_id is None else task_id, adapter_names=names, safe_merge=safe_merge)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        task_id: Optional[int] = None,
    ) -> nn.Module:
        """Merge expert ``task_id`` and return the plain base model (``task_id`` may be omitted when E == 1)."""
        names = self._check_mergeable(adapter_names)
        if task_id is None and any(self.peft_config[n].num_experts > 1 for n in names):
            raise ValueError("MoLA merges one task's expert: pass `merge_and_unload(task_id=...)`.")
        self.merge_task(0 if task_id is None else task_id, adapter_names=names, safe_merge=safe_merge)
        return self._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            names = self._check_mergeable(adapter_names)
            if any(self.peft_config[n].num_experts > 1 for n in names):
                raise ValueError("MoLA merges one task's expert: use `merge_and_unload(task_id=...)`.")
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._remove_hooks()
        if ROUTER_LAYER_NAME in model._modules:
            del model._modules[ROUTER_LAYER_NAME]
        return model

    def _remove_hooks(self) -> None:
        if not getattr(self, "_mola_state_ready", False):
            return
        if self._pre_hook_handle is not None:
            self._pre_hook_handle.remove()
            self._pre_hook_handle = None
        for handle in self._module_hooks.values():
            handle.remove()
        self._module_hooks.clear()
        if getattr(self.model.__dict__.get("generate"), "_mola_wrapped", False):
            del self.model.__dict__["generate"]

    # --- export -----------------------------------------------------------------------------------------------------
    def export_expert_as_lora(self, task_id: int, save_directory: str, adapter_name: str = "default", **kwargs):
        """Write expert ``task_id`` as a plain peft LoRA adapter (see ``hf_mmsel.mola.export``)."""
        from .export import export_expert_as_lora

        return export_expert_as_lora(self, task_id, save_directory, adapter_name=adapter_name, **kwargs)

