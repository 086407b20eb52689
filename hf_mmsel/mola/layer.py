"""MoLA tuner layers: E low-rank experts per wrapped Linear/Conv2d, mixed per sample by gates g in R^{N x E}.

Forward (paper: y = W x + sum_e g_e * s * B_e A_e x, s = alpha / r), computed for a mixed-task batch in ONE pass:
all experts' A are stacked (``[E*r, in]``), one matmul gives every expert's r activations, the per-sample gate
(one-hot task for MoLA-Grad, router gates for MoLA-Router) is repeated over each expert's r slots and multiplies
them, one matmul with all B stacked (``[out, E*r]``) sums the experts. An expert whose gate is 0 for every sample
gets exactly zero gradient. Cost is that of one LoRA of rank E*r, not E LoRA passes nor a per-sample gather.

The gates are written onto each layer (``_routing``) by ``MolaModel``'s forward pre-hook at every forward (the
previous forward's gates are dropped first, never reused), and stay until the next forward, so activation-checkpoint
recomputation sees the same gates. Without grad (serving) and with hard routing, Linear layers take
``_grouped_delta``: the batch sorted by task once per forward (``TaskGroups``), one (A_t, B_t) pair per task present.
A merged layer serves one task (``merged_task``); merging another task swaps the expert. The batch must be the
first dimension of every adapted layer's input; extra dimensions (tokens, pixels) share the sample's gate.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import MolaConfig


class TransientCache(dict):
    """A dict of per-forward tensors (gates, router logits) that is dropped, not copied, by ``copy.deepcopy`` and
    pickling: those tensors are non-leaf graph nodes after a grad-enabled forward, which deepcopy refuses (TRL-style
    reference-model copies do exactly this), and they are rewritten by the next forward anyway."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


class TaskGroups:
    """The samples of a batch grouped by task, computed once per forward and shared by every layer: ``perm`` sorts
    the batch by task (None when it is sorted already), ``inverse`` undoes it, ``segments`` lists
    ``(task, start, end)`` of the sorted batch. Used by the grad-free serving path (one small matmul pair per task
    present, no E*r-wide stacked matmul)."""

    def __init__(self, task_ids: torch.Tensor) -> None:
        ids = task_ids.reshape(-1)
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        tasks, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        identity = bool((order == torch.arange(ids.numel(), device=ids.device)).all())
        self.perm = None if identity else order
        self.inverse = None if identity else torch.argsort(order)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        self.segments = [(int(t), bounds[i], bounds[i + 1]) for i, t in enumerate(tasks.tolist())]

    def __deepcopy__(self, memo):
        return None


class MolaMergedTaskError(ValueError):
    """A batch was routed to a task other than the one whose expert is merged into the base weights."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``pytorch_utils.Conv1D`` (GPT-2's linear layers), without importing transformers here."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2


class MolaLayer(BaseTunerLayer):
    """Common state of MoLA layers: per adapter, the stacked experts and their rank, alpha, scaling, E."""

    adapter_layer_names = ("mola_A", "mola_B")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "mola_dropout", "conv_style")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mola_A = nn.ParameterDict({})
        self.mola_B = nn.ParameterDict({})
        self.mola_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.conv_style: dict[str, str] = {}
        self.merged_adapters: list[str] = []
        self.merged_task: dict[str, int] = {}
        self._disable_adapters = False
        # adapter name -> (gates [N, E] or [1, E], task_ids [N] or None); written by MolaModel per forward
        self._routing: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = TransientCache()
        self._groups: dict[str, Optional[TaskGroups]] = TransientCache()
        base = self.get_base_layer()
        self.fan_in_fan_out = False
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif is_conv1d(base):  # transformers' GPT-2 style Conv1D: weight [in, out], y = x W + b
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Conv2d):
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:  # pragma: no cover - guarded by MolaModel._create_new_module
            raise TypeError(f"MoLA supports nn.Linear and nn.Conv2d, got {type(base).__name__}.")

    # --- parameters ---------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MolaConfig, r: int, lora_alpha: float) -> None:
        """Create (or re-create) the experts of ``adapter_name``: A kaiming-uniform, B = 0 so the output is the base."""
        if r < 1:
            raise ValueError(f"MoLA rank must be >= 1, got {r}.")
        num_experts = config.num_experts
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.num_experts[adapter_name] = num_experts
        self.conv_style[adapter_name] = self._conv_style_for(config)
        self.mola_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        a_shape, b_shape = self._factor_shapes(adapter_name)
        self.mola_A[adapter_name] = nn.Parameter(torch.empty(a_shape))
        self.mola_B[adapter_name] = nn.Parameter(torch.empty(b_shape))
        self.reset_mola_parameters(adapter_name, config.init_weights)
        # a new adapter takes the base layer's device and dtype (peft's autocast_adapter_dtype upcasts it later)
        BaseTunerLayer._move_adapter_to_device_of_base_layer(self, adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """After a ``low_cpu_mem_usage`` load (the only later caller in peft): move ``adapter_name``'s experts to the
        base layer's device, keeping the saved dtype, so that the reload reproduces the saved model bit-exactly
        (peft's default would round float32 experts through a bf16/fp16 base dtype before autocast upcasts them)."""
        target = device if device is not None else self._get_base_layer_device_and_dtype(self.get_base_layer())[0]
        if target is None:
            return
        for attr in self.adapter_layer_names + ("mola_dropout",):
            params = getattr(self, attr)
            if adapter_name in params and params[adapter_name] is not None:
                item = params[adapter_name]
                tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
                if not any(t.device.type == "meta" for t in tensors):
                    params[adapter_name] = item.to(target) if not isinstance(item, nn.Parameter) else nn.Parameter(
                        item.data.to(target), requires_grad=item.requires_grad
                    )

    def _conv_style_for(self, config: MolaConfig) -> str:
        return "linear"

    def _factor_shapes(self, adapter_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @torch.no_grad()
    def reset_mola_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        a, b = self.mola_A[adapter_name], self.mola_B[adapter_name]
        # per expert, kaiming-uniform(a=sqrt(5)) over the expert's fan-in (as nn.Linear / loralib)
        fan_in = a.shape[-1] if a.dim() == 3 else a[0].numel()  # loralib A is [E, r*k, in*k]
        bound = 1.0 / math.sqrt(fan_in)
        a.uniform_(-bound, bound)
        if init_weights:
            b.zero_()
        else:  # non-zero B: used by tests to get a non-trivial update
            b.normal_(0.0, 0.5 / math.sqrt(max(1, b.shape[-1] if b.dim() != 4 else b.shape[1])))

    # --- routing --------------------------------------------------------------------------------------------------
    def set_routing(
        self,
        adapter_name: str,
        gates: torch.Tensor,
        task_ids: Optional[torch.Tensor] = None,
        groups: Optional[TaskGroups] = None,
    ) -> None:
        """Store the per-sample gates ([N, E]; [1, E] broadcasts) used by the next forward of this layer (and, for
        hard routing, the batch grouped by task)."""
        self._routing[adapter_name] = (gates, task_ids)
        self._groups[adapter_name] = groups

    def _gates(self, adapter_name: str, batch_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        routing = self._routing.get(adapter_name)
        if routing is None:
            raise RuntimeError(
                f"MoLA layer ({type(self).__name__}) has no routing for adapter {adapter_name!r}: call the PEFT model "
                "with `task_ids=` (routing='task'), or make sure the router ran before this layer (routing='router'), "
                "or use `with model.base_model.routing(task_ids=...)`."
            )
        gates, task_ids = routing
        if gates.shape[0] not in (1, batch_size):
            raise RuntimeError(
                f"MoLA routing has {gates.shape[0]} samples but this layer's input has batch size {batch_size}; "
                "the batch must be the first dimension of every adapted layer's input (task_ids has one id per sample)."
            )
        return gates, task_ids

    def _slot_mask(self, adapter_name: str, gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, E] gates -> [N, E*r] mask (each expert's gate on its r slots), times the scaling s."""
        r = self.r[adapter_name]
        return (gates.to(dtype) * self.scaling[adapter_name]).repeat_interleave(r, dim=1)

    def _resolve_task(self, adapter_name: str, task_id: Optional[int]) -> int:
        num_experts = self.num_experts[adapter_name]
        if task_id is None:
            if num_experts == 1:
                return 0
            raise ValueError(
                f"MoLA adapter {adapter_name!r} has {num_experts} experts: merging needs one task's expert; pass "
                "`task_id` (e.g. `model.base_model.merge_task(task_id)` or `merge_and_unload(task_id=...)`)."
            )
        if not 0 <= int(task_id) < num_experts:
            raise ValueError(f"task_id={task_id} is out of range for num_experts={num_experts}.")
        return int(task_id)

    # --- merge ------------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str, task_id: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, task_id: Optional[int] = None):
        """Add expert ``task_id`` of each adapter to the base weight (one task only: the merged model serves it)."""
        requested = adapter_names if adapter_names is not None else self.active_adapters
        for name in requested:  # another task's expert is merged: take it out first (LoRA-style switch)
            if name in self.merged_adapters and name in self.mola_A:
                if self.merged_task.get(name) != self._resolve_task(name, task_id):
                    self.unmerge()
                    break
        adapter_names = check_adapters_to_merge(self, adapter_names)  # warns, as peft, if already merged
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.mola_A:
                continue
            task = self._resolve_task(name, task_id)
            delta = self.get_delta_weight(name, task).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs/infs detected while merging MoLA adapter {name!r} (task {task}).")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)
            self.merged_task[name] = task

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            task = self.merged_task.pop(name)
            base.weight.data -= self.get_delta_weight(name, task).to(base.weight.dtype)

    # --- forward --------------------------------------------------------------------------------------------------
    def _delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.mola_A:
                continue
            result = result + self._delta(x, name).to(result.dtype)
        return result


class Linear(nn.Module, MolaLayer):
    """MoLA experts on an nn.Linear (or transformers' Conv1D, merged transposed): A stacked [E*r, in], B stacked
    [out, E*r]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MolaConfig, r: int, lora_alpha: float):
        super().__init__()
        MolaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha)

    def _factor_shapes(self, adapter_name):
        er = self.num_experts[adapter_name] * self.r[adapter_name]
        return (er, self.in_features), (self.out_features, er)

    def expert_factors(self, adapter: str, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t [r, in], B_t [out, r]) of expert ``task_id`` (views, unscaled)."""
        r = self.r[adapter]
        sl = slice(task_id * r, (task_id + 1) * r)
        return self.mola_A[adapter][sl], self.mola_B[adapter][:, sl]

    def get_delta_weight(self, adapter: str, task_id: Optional[int] = None) -> torch.Tensor:
        task = self._resolve_task(adapter, task_id)
        a, b = self.expert_factors(adapter, task)
        delta = (b.float() @ a.float()).to(a.dtype) * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta

    def _delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if x.dim() < 2:
            raise RuntimeError(f"MoLA Linear expects a batched input [N, ..., in], got shape {tuple(x.shape)}.")
        a = self.mola_A[adapter_name]
        gates, _ = self._gates(adapter_name, x.shape[0])
        x = self._cast_input_dtype(self.mola_dropout[adapter_name](x), a.dtype)
        groups = self._groups.get(adapter_name)
        if groups is not None and not torch.is_grad_enabled():
            return self._grouped_delta(x, adapter_name, groups)
        mask = self._slot_mask(adapter_name, gates, a.dtype)
        mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return F.linear(F.linear(x, a) * mask, self.mola_B[adapter_name])

    def _grouped_delta(self, x: torch.Tensor, adapter_name: str, groups: TaskGroups) -> torch.Tensor:
        """Serving path (no grad, hard routing): sort the batch by task once, one (A_t, B_t) matmul pair per task
        present on its contiguous slice, unsort. Cost ~ one LoRA of rank r plus two gathers, flat in E."""
        xs = x if groups.perm is None else x.index_select(0, groups.perm)
        scale = self.scaling[adapter_name]
        if len(groups.segments) == 1:
            a, b = self.expert_factors(adapter_name, groups.segments[0][0])
            return F.linear(F.linear(xs, a), b) * scale
        out = xs.new_empty((*xs.shape[:-1], self.out_features))
        for task, start, end in groups.segments:
            a, b = self.expert_factors(adapter_name, task)
            torch.mul(F.linear(F.linear(xs[start:end], a), b), scale, out=out[start:end])
        return out if groups.inverse is None else out.index_select(0, groups.inverse)

    forward = MolaLayer.forward  # nn.Module comes first in the MRO

    def __repr__(self) -> str:
        return "mola." + super().__repr__()


class Conv2d(nn.Module, MolaLayer):
    """MoLA experts on an nn.Conv2d (groups=1).

    ``factorized``: A [E*r, in, k, k] is a conv with the base stride/padding/dilation, B [out, E*r, 1, 1] a 1x1 conv;
    gates multiply each expert's r channels. ``loralib`` (official MoLA/loralib): A [E, r*k, in*k], B [E, out*k, r*k],
    dW_e = reshape(B_e A_e, [out, in, k, k]) * s applied in weight space (hard routing: one conv per task present;
    soft routing: one conv with all E dW stacked, then the gate-weighted sum).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MolaConfig, r: int, lora_alpha: float):
        super().__init__()
        MolaLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if base.groups != 1:
            raise ValueError(f"MoLA Conv2d supports groups=1 only (got groups={base.groups}); exclude this module.")
        if base.kernel_size[0] != base.kernel_size[1]:
            raise ValueError(f"MoLA Conv2d needs a square kernel, got {base.kernel_size}.")
        if base.padding_mode != "zeros":
            raise ValueError(f"MoLA Conv2d supports padding_mode='zeros' only, got {base.padding_mode!r}.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha)

    def _conv_style_for(self, config: MolaConfig) -> str:
        return config.conv_style

    def _factor_shapes(self, adapter_name):
        e, r = self.num_experts[adapter_name], self.r[adapter_name]
        k = self.get_base_layer().kernel_size[0]
        if self.conv_style[adapter_name] == "factorized":
            return (e * r, self.in_features, k, k), (self.out_features, e * r, 1, 1)
        return (e, r * k, self.in_features * k), (e, self.out_features * k, r * k)

    def expert_factors(self, adapter: str, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factorized style: (A_t [r, in, k, k], B_t [out, r, 1, 1]); loralib: (A_t [r*k, in*k], B_t [out*k, r*k])."""
        if self.conv_style[adapter] == "loralib":
            return self.mola_A[adapter][task_id], self.mola_B[adapter][task_id]
        r = self.r[adapter]
        sl = slice(task_id * r, (task_id + 1) * r)
        return self.mola_A[adapter][sl], self.mola_B[adapter][:, sl]

    def _loralib_delta_weights(self, adapter: str) -> torch.Tensor:
        """All experts' dW_e = reshape(B_e A_e) * s, stacked [E, out, in, k, k]."""
        base = self.get_base_layer()
        a, b = self.mola_A[adapter], self.mola_B[adapter]
        e = a.shape[0]
        return (b @ a).view(e, *base.weight.shape) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str, task_id: Optional[int] = None) -> torch.Tensor:
        task = self._resolve_task(adapter, task_id)
        a, b = self.expert_factors(adapter, task)
        if self.conv_style[adapter] == "loralib":
            return (b @ a).view(self.get_base_layer().weight.shape) * self.scaling[adapter]
        # 1x1 conv after a kxk conv == kxk conv with weight B_t[:, :, 0, 0] @ A_t
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling[adapter]

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation)

    def _delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if x.dim() != 4:
            raise RuntimeError(f"MoLA Conv2d expects a batched input [N, C, H, W], got shape {tuple(x.shape)}.")
        a = self.mola_A[adapter_name]
        gates, task_ids = self._gates(adapter_name, x.shape[0])
        x = self._cast_input_dtype(self.mola_dropout[adapter_name](x), a.dtype)
        if self.conv_style[adapter_name] == "factorized":
            h = self._conv(x, a) * self._slot_mask(adapter_name, gates, a.dtype)[:, :, None, None]
            return F.conv2d(h, self.mola_B[adapter_name])
        if task_ids is not None:  # hard routing: one conv per task present, ~1x base FLOPs
            if task_ids.numel() == 1:
                return self._conv(x, self.get_delta_weight(adapter_name, int(task_ids.reshape(-1)[0])))
            out = None
            for task in torch.unique(task_ids).tolist():
                idx = (task_ids == task).nonzero(as_tuple=True)[0]
                part = self._conv(x[idx], self.get_delta_weight(adapter_name, task))
                if out is None:
                    out = part.new_zeros((x.shape[0], *part.shape[1:]))
                out = out.index_add(0, idx, part)
            return out
        # soft routing: all experts in one conv with E*out channels, then the gate-weighted sum
        delta_w = self._loralib_delta_weights(adapter_name)
        e, o = delta_w.shape[0], delta_w.shape[1]
        y = self._conv(x, delta_w.reshape(e * o, *delta_w.shape[2:]))
        y = y.view(y.shape[0], e, o, *y.shape[2:])
        return torch.einsum("ne,neohw->nohw", gates.to(y.dtype).expand(y.shape[0], -1), y)

    forward = MolaLayer.forward  # nn.Module comes first in the MRO

    def __repr__(self) -> str:
        return "mola." + super().__repr__()
