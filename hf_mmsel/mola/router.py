"""MoLA-Router gate network (paper §3): one router per adapter, shared by all adapted layers.

``logits s(x) in R^E`` per sample, ``g = softmax(s / T)``; with ``top_k`` only the k largest logits are kept (masked
softmax, i.e. the top-k softmax probabilities renormalised; gradients flow through the kept logits). The official
router is a CIFAR ResNet on the raw image; this one is a cheaper two-conv net for images and an MLP for vectors or
for pooled features of a named module (``router_input="module:<name>"``).
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def pool_features(features) -> torch.Tensor:
    """Pool a module output to [N, d]: [N, C, H, W] -> mean over H, W; [N, T, d] -> mean over T; ModelOutput or
    tuple -> its ``pooler_output`` if present, else its first tensor."""
    if not isinstance(features, torch.Tensor):
        pooled = getattr(features, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            features = pooled
        elif isinstance(features, (tuple, list)) or hasattr(features, "to_tuple"):
            items = features.to_tuple() if hasattr(features, "to_tuple") else features
            tensors = [t for t in items if isinstance(t, torch.Tensor)]
            if not tensors:
                raise TypeError(f"MoLA router: module output of type {type(features).__name__} holds no tensor.")
            features = tensors[0]
        else:
            raise TypeError(f"MoLA router: cannot pool a module output of type {type(features).__name__}.")
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 2:
        return features
    raise ValueError(f"MoLA router: cannot pool features of shape {tuple(features.shape)} to [N, d].")


def gates_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """``g = softmax(s / T)``; with ``top_k`` the logits outside the top k are masked to -inf before the softmax."""
    scaled = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.softmax(scaled, dim=-1)


class MolaRouter(nn.Module):
    """Gate network: ``kind="conv"`` (images [N, C, H, W]) or ``"mlp"`` (vectors [N, d]; [N, T, d] is mean-pooled)."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        hidden: int = 64,
        kind: str = "mlp",
        temperature: float = 1.0,
        top_k: Optional[int] = None,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "mlp"):
            raise ValueError(f"MolaRouter kind={kind!r} is not valid; choose one of ['conv', 'mlp'].")
        self.kind = kind
        self.in_features = in_features
        self.num_experts = num_experts
        self.temperature = temperature
        self.top_k = top_k
        if kind == "conv":
            width = max(8, hidden // 4)
            self.net = nn.Sequential(
                nn.Conv2d(in_features, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, num_experts),
            )
        else:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits [N, E], gates [N, E])."""
        if not torch.is_floating_point(x):
            raise TypeError(
                f"MoLA router got a {x.dtype} input (token ids?): use router_input='module:<name>' to route on the "
                "features of an early module instead."
            )
        if self.kind == "conv":
            if x.dim() != 4 or x.shape[1] != self.net[0].in_channels:
                raise ValueError(
                    f"MoLA conv router expects images [N, {self.net[0].in_channels}, H, W], got shape "
                    f"{tuple(x.shape)}: set MolaConfig.router_kind ('conv' or 'mlp') and router_in_features."
                )
        else:
            if x.dim() == 4:
                raise ValueError(
                    f"MoLA MLP router got an image batch of shape {tuple(x.shape)}: use "
                    "MolaConfig(router_kind='conv') (or 'auto' with a forward(pixel_values, ...) model)."
                )
            if x.dim() != 2:
                x = pool_features(x)
            if x.shape[-1] != self.net[0].in_features:
                raise ValueError(
                    f"MoLA MLP router expects {self.net[0].in_features} input features, got {x.shape[-1]} "
                    f"(input shape {tuple(x.shape)}): set MolaConfig.router_in_features."
                )
        x = x.to(self.net[0].weight.dtype)
        logits = self.net(x)
        return logits, gates_from_logits(logits, self.temperature, self.top_k)


class TwdProjection(nn.Module):
    """The TwD projection P (E -> D) of router logits: a fixed random matrix, a saved buffer, **not a parameter**.

    The official code learns P (``map_to_high_dim``). Here P is fixed (seeded normal / sqrt(D), saved with the adapter
    so a reload is exact) so that every trainable parameter of a MoLA model gets a gradient from the task loss alone:
    a plain training step without ``mola_aux_loss`` (a bare ``Trainer``, peft's generic tests, DDP without
    ``find_unused_parameters``) leaves nothing trainable without a gradient. TwD still shapes the router through P.
    """

    def __init__(self, num_experts: int, proj_dim: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        weight = torch.randn(proj_dim, num_experts, generator=generator) / proj_dim**0.5
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() @ self.weight.float().T


class _RecomputedRouter(torch.autograd.Function):
    """``(logits, gates) = router(x)`` whose backward re-runs the router (no saved graph).

    The gates are shared by every adapted layer. With reentrant activation checkpointing each checkpointed segment
    runs its own backward, so a router graph saved in the forward would be traversed (and freed) by the first
    segment and crash the second ("backward through the graph a second time"). This node keeps only references and
    recomputes the router at each backward call: each segment's contribution reaches the router parameters.
    """

    @staticmethod
    def forward(ctx, router: nn.Module, x: torch.Tensor, *params: torch.Tensor):
        ctx.router, ctx.x, ctx.params = router, x, params
        with torch.no_grad():
            logits, gates = router(x)
        return logits, gates

    @staticmethod
    def backward(ctx, grad_logits, grad_gates):
        x = ctx.x.detach().requires_grad_(ctx.x.requires_grad)
        with torch.enable_grad():
            logits, gates = ctx.router(x)
        outputs = [o for o, g in ((logits, grad_logits), (gates, grad_gates)) if g is not None]
        grads = [g for g in (grad_logits, grad_gates) if g is not None]
        inputs = ([x] if x.requires_grad else []) + list(ctx.params)
        if not outputs or not inputs:
            return (None, None, *([None] * len(ctx.params)))
        result = list(torch.autograd.grad(outputs, inputs, grads, allow_unused=True))
        grad_x = result.pop(0) if x.requires_grad else None
        return (None, grad_x, *result)


def run_router(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, gates) of ``router(x)``; under autograd through :class:`_RecomputedRouter` (checkpoint-safe)."""
    if isinstance(x, torch.Tensor) and not torch.is_floating_point(x):
        raise TypeError(
            f"MoLA router got a {x.dtype} input (token ids?): a router on the model input needs float features or "
            "images; use router_input='module:<name>' (e.g. the embedding layer) to route on an early module's output."
        )
    params = [p for p in router.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (params or x.requires_grad):
        return router(x)
    return _RecomputedRouter.apply(router, x, *params)


class MolaRouterLayer(nn.Module, BaseTunerLayer):
    """Holder of the model-level MoLA modules, one entry per adapter: ``mola_router`` (gate network) and
    ``mola_twd_proj`` (fixed TwD projection).

    It is attached to the adapted model itself (attribute :data:`ROUTER_LAYER_NAME`), not to the tuner, and it is a
    peft ``BaseTunerLayer``: so the router is in ``model.parameters()`` and in ``get_peft_model_state_dict`` also
    after ``inject_adapter_in_model`` / transformers' ``model.add_adapter``, and peft's own bookkeeping
    (``set_adapter``, ``set_requires_grad``, ``delete_adapter``, ``enable/disable_adapter_layers``, inference mode,
    dtype autocast, ``load_adapter(..., is_trainable=...)``, the device move after a ``low_cpu_mem_usage`` load)
    covers it like any adapter layer. Saved keys follow peft's scheme with the adapter name stripped
    (``mola_routing.mola_router.net.0.weight``; in the model ``mola_routing.mola_router.<adapter>.net.0.weight``).

    It has no base layer of its own: :meth:`get_base_layer` is the base layer of the first MoLA layer of the model
    (``owner``, kept as a plain reference, not a submodule), whose device and dtype the routers follow. It has
    nothing to merge.
    """

    adapter_layer_names = ("mola_router", "mola_twd_proj")
    other_param_names = ()

    def __init__(self, owner: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.mola_router = nn.ModuleDict()
        self.mola_twd_proj = nn.ModuleDict()
        self._active_adapter = []
        self.merged_adapters = []
        self._disable_adapters = False
        self.kwargs = {}
        self.__dict__["_owner"] = owner  # not a submodule: the model that holds this layer

    def get_base_layer(self) -> nn.Module:
        """The base layer of the owner's first MoLA layer (a reference for device and dtype), else ``self``."""
        owner = self.__dict__.get("_owner")
        if owner is not None:
            for module in owner.modules():
                if module is not self and isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
                    return module.get_base_layer()
        return self

    @property
    def weight(self) -> Optional[torch.Tensor]:
        """The reference base layer's weight (peft reads ``weight`` for device and dtype); None without one."""
        base = self.get_base_layer()
        return None if base is self else getattr(base, "weight", None)

    def _router(self) -> Optional[nn.Module]:
        names = [n for n in self.active_adapters if n in self.mola_router] or list(self.mola_router.keys())
        return self.mola_router[names[0]] if names else None

    @property
    def in_features(self) -> Optional[int]:
        """Input width (features or image channels) of the active (else first) adapter's router."""
        router = self._router()
        return None if router is None else router.in_features

    @property
    def out_features(self) -> Optional[int]:
        """Number of experts E gated by the active (else first) adapter's router."""
        router = self._router()
        return None if router is None else router.num_experts

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move ``adapter_name``'s router and TwD projection to the reference base layer's device, keeping their
        dtype (called by peft after a ``low_cpu_mem_usage`` load: the saved dtype is kept, so the reload is exact;
        routers are created in the experts' dtype by ``MolaModel``)."""
        target = device if device is not None else self._get_base_layer_device_and_dtype(self.get_base_layer())[0]
        if target is None:
            return
        for attr in self.adapter_layer_names:
            modules = getattr(self, attr)
            if adapter_name not in modules:
                continue
            item = modules[adapter_name]
            tensors = list(item.parameters()) + list(item.buffers())
            if any(t.device.type == "meta" for t in tensors):
                continue
            modules[adapter_name] = item.to(target)

    def merge(self, safe_merge: bool = False, adapter_names=None, **kwargs) -> None:
        """Nothing to merge (router adapters are refused by ``MolaModel`` before any layer merges)."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def forward(self, *args, **kwargs):  # pragma: no cover - a container, never called
        raise RuntimeError("MolaRouterLayer is a container of MoLA routers; call the routers in `mola_router`.")


ROUTER_LAYER_NAME = "mola_routing"
