"""`MolaConfig`: configuration of MoLA (Mixture of Low-rank Adapters, Zhou et al., ICML 2024, arXiv 2406.09679).

Each adapted layer holds ``num_experts`` LoRA experts (A_e, B_e) of rank ``r``; a per-sample gate g in R^E mixes them:
``y = W x + s * sum_e g_e B_e A_e x`` with ``s = lora_alpha / r``. MoLA-Grad (``routing="task"``) uses the one-hot
task of each sample as g; MoLA-Router (``routing="router"``) uses ``softmax(router(x) / T)`` and is trained with the
Task-wise Decorrelation loss (TwD, paper §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

MOLA_PEFT_TYPE = "MOLA"
ROUTING_CHOICES = ("task", "router")
CONV_STYLE_CHOICES = ("factorized", "loralib")
TWD_AVERAGE_CHOICES = ("pairs", "anchors")
ROUTER_KIND_CHOICES = ("auto", "conv", "mlp")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MolaConfig.{name}={value!r} is not a valid choice; choose one of {list(choices)}.")


@dataclass
class MolaConfig(PeftConfig):
    """Configuration of a MoLA adapter (peft_type ``"MOLA"``; needs ``import hf_mmsel`` to be registered).

    Args:
        r: rank of each expert (per-module overrides in ``rank_pattern``).
        lora_alpha: scaling numerator, ``s = lora_alpha / r`` (overrides in ``alpha_pattern``).
        num_experts: number of experts E (= number of tasks for MoLA-Grad).
        routing: ``"task"`` (MoLA-Grad: one-hot gate from ``task_ids``) or ``"router"`` (MoLA-Router: learned gates).
        conv_style: Conv2d experts as ``"factorized"`` (k x k conv in->r, then 1x1 conv r->out; PEFT style, exportable
            as plain LoRA) or ``"loralib"`` (the official weight-space update reshape(B_e A_e) of rank up to r*k).
        router_input: ``"input"`` (router reads the model input; integer token ids are replaced by the
            token-mean-pooled output of the model's input embedding) or ``"module:<dotted.name>"`` (router reads the
            pooled output of that module, which must run before every adapted layer).
        router_kind: ``"auto"``, ``"conv"`` (images ``[N, C, H, W]``) or ``"mlp"`` (vectors ``[N, d]``; tokens
            ``[N, T, d]`` are mean-pooled) for ``router_input="input"``. ``"auto"`` picks a conv router when the model
            input is an image batch (root ``forward(pixel_values, ...)``, a root config with ``num_channels``, or a
            Conv2d as first adapted layer) and an MLP otherwise. A ``module:`` router is always an MLP on pooled
            features. The kind and width are fixed when the adapter is created (so optimizers and
            ``from_pretrained`` see the router's parameters).
        router_in_features: input channels/features of the router; inferred when None.
        router_hidden: hidden width of the router.
        router_temperature: softmax temperature T of the gates, ``g = softmax(s / T)``.
        router_top_k: keep the k largest logits and renormalise (masked softmax); None keeps all experts.
        twd_weight, twd_temperature, twd_proj_dim, twd_average: Task-wise Decorrelation loss (paper §3): weight
            (0.1 officially), temperature tau, projection width (32 officially), ``"pairs"`` (official averaging over
            positive pairs) or ``"anchors"`` (SupCon per-anchor averaging). The projection is a fixed seeded matrix
            saved with the adapter, not a learned parameter (``hf_mmsel.mola.router.TwdProjection``).
        task_names: optional names of the experts/tasks, index = task id.
    """

    r: int = field(default=4, metadata={"help": "Rank of each expert."})
    lora_alpha: int = field(default=16, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    num_experts: int = field(default=2, metadata={"help": "Number of experts E (tasks for MoLA-Grad)."})
    routing: Literal["task", "router"] = field(
        default="task", metadata={"help": "'task' (MoLA-Grad, one-hot by task_ids) or 'router' (MoLA-Router)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the modules to adapt (Linear, Conv2d)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (with layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h'."}
    )
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank overrides."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module alpha overrides."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the experts."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the MoLA layers to train and save (e.g. task heads)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: A kaiming-uniform, B zero (output = base). False: random B (tests)."}
    )
    conv_style: Literal["factorized", "loralib"] = field(
        default="factorized", metadata={"help": "Conv2d experts: 'factorized' (PEFT style) or 'loralib' (official)."}
    )
    router_input: str = field(
        default="input", metadata={"help": "'input' or 'module:<dotted.name>' (pooled output of that module)."}
    )
    router_kind: Literal["auto", "conv", "mlp"] = field(
        default="auto",
        metadata={"help": "Router for router_input='input': 'auto' (conv on images, else MLP), 'conv' or 'mlp'."},
    )
    router_in_features: Optional[int] = field(
        default=None, metadata={"help": "Router input channels/features (inferred when None)."}
    )
    router_hidden: int = field(default=64, metadata={"help": "Hidden width of the router."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the gates."})
    router_top_k: Optional[int] = field(default=None, metadata={"help": "Keep the top-k experts per sample."})
    twd_weight: float = field(default=0.1, metadata={"help": "Weight of the TwD loss (paper: 0.1)."})
    twd_temperature: float = field(default=1.0, metadata={"help": "Temperature tau of the TwD loss."})
    twd_proj_dim: int = field(default=32, metadata={"help": "Width of the TwD projection of router logits."})
    twd_average: Literal["pairs", "anchors"] = field(
        default="pairs", metadata={"help": "TwD averaging: over positive 'pairs' (official) or per 'anchors'."}
    )
    task_names: Optional[list[str]] = field(default=None, metadata={"help": "Optional names of the tasks/experts."})
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by MoLA; kept for peft's target matching."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft.utils import PeftType

        # the enum member once hf_mmsel.mola.registration ran, else the plain string (equal and same hash)
        self.peft_type = PeftType.__members__.get(MOLA_PEFT_TYPE, MOLA_PEFT_TYPE)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the offending field."""
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MolaConfig.num_experts must be an integer >= 1, got {self.num_experts!r}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"MolaConfig.r must be an integer >= 1, got {self.r!r}.")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MolaConfig.rank_pattern[{key!r}] must be an integer >= 1, got {value!r}.")
        _check_choice("routing", self.routing, ROUTING_CHOICES)
        _check_choice("conv_style", self.conv_style, CONV_STYLE_CHOICES)
        _check_choice("twd_average", self.twd_average, TWD_AVERAGE_CHOICES)
        _check_choice("router_kind", self.router_kind, ROUTER_KIND_CHOICES)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MolaConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.router_input != "input" and not (
            self.router_input.startswith("module:") and len(self.router_input) > len("module:")
        ):
            raise ValueError(
                f"MolaConfig.router_input={self.router_input!r} is not valid; use 'input' or 'module:<dotted.name>'."
            )
        if self.router_kind == "conv" and self.router_input != "input":
            raise ValueError(
                f"MolaConfig.router_kind='conv' needs router_input='input' (images); a router on "
                f"{self.router_input!r} reads pooled features and is an MLP (router_kind='auto' or 'mlp')."
            )
        if self.router_top_k is not None and not 1 <= self.router_top_k <= self.num_experts:
            raise ValueError(
                f"MolaConfig.router_top_k={self.router_top_k} must be in [1, num_experts={self.num_experts}] or None."
            )
        if self.router_temperature <= 0:
            raise ValueError(f"MolaConfig.router_temperature must be > 0, got {self.router_temperature!r}.")
        if self.twd_temperature <= 0:
            raise ValueError(f"MolaConfig.twd_temperature must be > 0, got {self.twd_temperature!r}.")
        if self.twd_weight < 0:
            raise ValueError(f"MolaConfig.twd_weight must be >= 0, got {self.twd_weight!r}.")
        if self.router_hidden < 1 or self.twd_proj_dim < 1:
            raise ValueError("MolaConfig.router_hidden and MolaConfig.twd_proj_dim must be >= 1.")
        if self.router_in_features is not None and self.router_in_features < 1:
            raise ValueError(f"MolaConfig.router_in_features must be >= 1, got {self.router_in_features!r}.")
        if self.task_names is not None and len(self.task_names) != self.num_experts:
            raise ValueError(
                f"MolaConfig.task_names has {len(self.task_names)} names but num_experts={self.num_experts}."
            )
        if self.target_parameters:
            raise ValueError("MolaConfig.target_parameters is not supported by MoLA; use target_modules.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("MolaConfig.layers_pattern needs layers_to_transform to be set.")

    @property
    def uses_router(self) -> bool:
        return self.routing == "router"
